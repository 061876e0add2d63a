"""The shared plumbing: config mechanism, LR schedule, checkpoint I/O, world-size-independent micro-batching."""
import math

import numpy as np
import pytest
import torch

from common import (Context, adamw, configure, get_lr, load_checkpoint, load_weights, micro_batch_targets,
                    save_checkpoint, shard_batches)

DEFAULTS = dict(lr=1e-3, max_steps=100, dataset="synthetic", compile=False, dims=(64, 16), init=None)


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nlr = 3e-4\nmax_steps = 7\n_private = 1\n")
    cfg = configure(DEFAULTS, [str(f), "--lr=1", "--dataset=ml20m", "--compile=True", "--dims=[8, 4]", "--init=None"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # int -> float
    assert cfg.max_steps == 7 and cfg.dataset == "ml20m" and cfg.compile is True and cfg.dims == (8, 4)
    assert cfg.init is None


def test_config_typo_names_the_key(tmp_path):
    with pytest.raises(SystemExit, match="unknown key 'lrr'.*did you mean 'lr'"):
        configure(DEFAULTS, ["--lrr=1"])
    f = tmp_path / "c.py"
    f.write_text("max_step = 3\n")
    with pytest.raises(SystemExit, match="unknown key 'max_step' in .*c.py"):
        configure(DEFAULTS, [str(f)])


def test_config_type_errors():
    with pytest.raises(SystemExit, match="'max_steps' expects int"):
        configure(DEFAULTS, ["--max_steps=1.5"])
    with pytest.raises(SystemExit, match="'compile' expects True/False"):
        configure(DEFAULTS, ["--compile=3"])
    with pytest.raises(SystemExit, match="expected --key=value"):
        configure(DEFAULTS, ["--lr", "1"])


def test_config_file_errors_are_one_line(tmp_path):
    """A config file that is not valid Python, or fails when run, is one line: file, line, what is wrong."""
    f = tmp_path / "c.py"
    f.write_text("lr = 3e-4\nmax_steps = (7\n")
    with pytest.raises(SystemExit, match=r"^config: .*c.py:2: .*(never closed|invalid syntax)"):
        configure(DEFAULTS, [str(f)])
    f.write_text("lr = 3e-4\n\nmax_steps = steps * 2\n")
    with pytest.raises(SystemExit, match=r"^config: .*c.py:3: NameError: name 'steps' is not defined$"):
        configure(DEFAULTS, [str(f)])


def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        configure(DEFAULTS, ["--lr=1", "-h"], "Train something.\n")
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("Train something.")
    assert "--max_steps" in out and "100" in out and "(64, 16)" in out and "'synthetic'" in out


def test_lr_schedule():
    lrs = [get_lr(s, 1.0, 10, 110, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)  # cosine midpoint
    assert lrs[110] == lrs[119] == 0.1 and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_checkpoint_roundtrip_and_bad_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": {"w": torch.arange(3.0)}, "step": 5, "config": {"a": 1}}, path)
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt.pt"]  # no temporary file left behind
    ck = load_checkpoint(path)
    assert ck["step"] == 5 and torch.equal(ck["model"]["w"], torch.arange(3.0))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x02garbage")  # a pickle stream, but not one of a checkpoint
    with pytest.raises(SystemExit, match="cannot read checkpoint .*pickle.pt: not a checkpoint, or a damaged one$"):
        load_checkpoint(str(tmp_path / "pickle.pt"))
    with pytest.raises(SystemExit, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_checkpoint_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"f": math.sqrt}, path)  # a pickled function: weights_only=True must refuse it
    with pytest.raises(SystemExit) as e:
        load_checkpoint(str(path))
    assert str(e.value) == f"{path} is not a plain weights checkpoint and was not loaded: loading it could run code"


def test_evaluation_batches_do_not_depend_on_world_size():
    """Each rank evaluates whole batches of the single-process split, so every batch's numbers are the same."""
    ids = np.arange(23)
    one = [(i, b.tolist()) for i, b in shard_batches(ids, 5)]
    assert [i for i, _ in one] == [0, 1, 2, 3, 4]
    for world in (2, 3, 7):
        shards = [shard_batches(ids, 5, Context(r, r, world, torch.device("cpu"), torch.float32)) for r in range(world)]
        assert sorted((i, b.tolist()) for s in shards for i, b in s) == one


def test_micro_batches_do_not_depend_on_world_size():
    ids = np.arange(12)
    one = micro_batch_targets(ids, Context(0, 0, 1, torch.device("cpu"), torch.float32), 4)
    two = [micro_batch_targets(ids, Context(r, r, 2, torch.device("cpu"), torch.float32), 4) for r in range(2)]
    assert [(i, c.tolist()) for i, c in one] == [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6, 7, 8]), (3, [9, 10, 11])]
    assert [(i, c.tolist()) for i, c in two[0]] == [(0, [0, 1, 2]), (2, [6, 7, 8])]
    assert [(i, c.tolist()) for i, c in two[1]] == [(1, [3, 4, 5]), (3, [9, 10, 11])]
    with pytest.raises(SystemExit, match="multiple of the world size"):
        micro_batch_targets(ids, Context(0, 0, 2, torch.device("cpu"), torch.float32), 3)


def test_adamw_groups_and_lr_multipliers():
    """Matrices decay, vectors don't; lr_mult gives named parameters their own learning rate under the schedule."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model.register_parameter("gate_attn", torch.nn.Parameter(torch.zeros(1)))
    opt = adamw(model, 0.5, 0.1, lr_mult={"gate_": 10.0})
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model[0].weight)]["weight_decay"] == 0.1 and by_param[id(model[0].bias)]["weight_decay"] == 0.0
    assert by_param[id(model.gate_attn)]["lr_mult"] == 10.0 and by_param[id(model[1].weight)]["lr_mult"] == 1.0
    assert sum(len(g["params"]) for g in opt.param_groups) == 5


def test_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    model = torch.nn.Linear(3, 4)
    with pytest.raises(SystemExit, match=r"ckpt.pt does not fit this model: .*size mismatch"):
        load_weights(model, torch.nn.Linear(3, 5).state_dict(), "ckpt.pt")

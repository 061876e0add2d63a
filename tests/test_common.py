"""common.py: LR schedule, checkpoint I/O, world-size-independent batches, AdamW groups, the ranking
metrics and the results table."""
import errno
import math
import os
import types

import numpy as np
import pytest
import torch

from common import (Runtime, adamw, get_lr, load_checkpoint, load_weights, micro_batches,
                    print_table, ranking_metrics, save_checkpoint, shard_batches)
from config import UserError


def test_lr_schedule():
    cfg = types.SimpleNamespace(lr=1.0, warmup_steps=10, lr_decay_steps=110, max_steps=200,
                                min_lr=0.1)
    lrs = [get_lr(s, cfg) for s in range(120)]
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
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(str(tmp_path / "bad.pt"))
    # a pickle stream, but not one of a checkpoint
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError, match="cannot read checkpoint .*pickle.pt: not a checkpoint, "
                                        "or a damaged one$"):
        load_checkpoint(str(tmp_path / "pickle.pt"))
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


class Payload:
    """What a malicious file would hold: unpickling it calls os.system."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload", [math.sqrt, Payload()])
def test_checkpoint_refuses_pickled_code(tmp_path, payload):
    """A pickled function, or a payload that would call os.system when unpickled, is refused as
    code, in one line, and never run."""
    path = tmp_path / "evil.pt"
    torch.save({"model": payload}, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(str(path))
    assert str(e.value) == (f"{path} holds code (a pickled class or function) and was not loaded: "
                            "a checkpoint is data")


def test_a_damaged_or_foreign_checkpoint_is_refused(tmp_path):
    """A checkpoint carries a checksum of its content: one flipped byte in a weight is refused in
    one line, not scored silently; a torch file that is no checkpoint of ours is named as such."""
    path = tmp_path / "ckpt.pt"
    w = torch.arange(1000, dtype=torch.float32)
    save_checkpoint({"model": {"w": w}, "config": {"a": 1}}, str(path))
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(w.numpy().tobytes()[2000:2016])  # the weight's bytes, stored raw
    assert at > 0
    raw[at + 3] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError,
                       match="ckpt.pt is damaged: its content does not match its checksum"):
        load_checkpoint(str(path))
    torch.save({"model": {"w": w}}, tmp_path / "other.pt")
    with pytest.raises(UserError,
                       match="other.pt is not a checkpoint of train_encoder.py or train_llm.py"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    """ENOSPC (or a read-only folder) while saving: one line naming the file; the temporary is
    removed and the previous checkpoint stays whole."""
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)

    def full(obj, f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="cannot write .*ckpt.pt: No space left on device"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"] and torch.equal(load_checkpoint(path)["model"]["w"],
                                                                torch.ones(3))


def test_evaluation_batches_do_not_depend_on_world_size():
    """Each rank evaluates whole batches of the single-process split, so every batch's numbers are
    the same."""
    ids = np.arange(23)
    one = [(i, b.tolist()) for i, b in shard_batches(ids, 5)]
    assert [i for i, _ in one] == [0, 1, 2, 3, 4]
    for world in (2, 3, 7):
        shards = [shard_batches(ids, 5, Runtime(r, r, world, torch.device("cpu"), torch.float32))
                  for r in range(world)]
        assert sorted((i, b.tolist()) for s in shards for i, b in s) == one


def test_micro_batches_do_not_depend_on_world_size():
    ids = np.arange(12)
    one = micro_batches(ids, Runtime(0, 0, 1, torch.device("cpu"), torch.float32), 4)
    two = [micro_batches(ids, Runtime(r, r, 2, torch.device("cpu"), torch.float32), 4)
           for r in range(2)]
    assert [(i, c.tolist()) for i, c in one] == [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6, 7, 8]),
                                                 (3, [9, 10, 11])]
    assert [(i, c.tolist()) for i, c in two[0]] == [(0, [0, 1, 2]), (2, [6, 7, 8])]
    assert [(i, c.tolist()) for i, c in two[1]] == [(1, [3, 4, 5]), (3, [9, 10, 11])]
    with pytest.raises(UserError, match="multiple of the world size"):
        micro_batches(ids, Runtime(0, 0, 2, torch.device("cpu"), torch.float32), 3)


def test_adamw_groups_and_lr_multipliers():
    """Matrices decay, vectors don't; lr_mult gives named parameters their own learning rate under
    the schedule."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model.register_parameter("gate_attn", torch.nn.Parameter(torch.zeros(1)))
    opt = adamw(model, 0.5, 0.1, lr_mult={"gate_": 10.0})
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert (by_param[id(model[0].weight)]["weight_decay"] == 0.1
            and by_param[id(model[0].bias)]["weight_decay"] == 0.0)
    assert (by_param[id(model.gate_attn)]["lr_mult"] == 10.0
            and by_param[id(model[1].weight)]["lr_mult"] == 1.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == 5


def test_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    model = torch.nn.Linear(3, 4)
    with pytest.raises(UserError, match=r"ckpt.pt does not fit this model: .*size mismatch"):
        load_weights(model, torch.nn.Linear(3, 5).state_dict(), "ckpt.pt")


def test_ranking_metrics_against_brute_force():
    torch.manual_seed(0)
    scores = torch.randn(50, 30)
    scores[:, 0] = -float("inf")
    target = torch.randint(1, 30, (50,))
    m = ranking_metrics(scores, target)
    ranks = [(scores[b] > scores[b, target[b]]).sum().item() for b in range(50)]
    assert m["recall@5"] == pytest.approx(np.mean([r < 5 for r in ranks]))
    assert m["ndcg@10"] == pytest.approx(np.mean([1 / np.log2(r + 2) if r < 10 else 0
                                                  for r in ranks]))
    flat = ranking_metrics(torch.zeros(4, 10), torch.tensor([1, 2, 3, 4]))
    # ties count against the target: a constant scorer gets no credit
    assert flat["recall@5"] == 0.0


def test_results_table_shows_every_rows_metrics(capsys):
    """A model's row may hold metrics the reference rows lack (beam_recall@k): every row's metrics
    are printed."""
    print_table({"User-LLM": {"beam_recall@10": 0.25}, "most popular": {"recall@10": 0.0625}})
    header, model, popular = capsys.readouterr().out.splitlines()
    assert header.split() == ["beam_recall@10", "recall@10"]
    assert (model.split() == ["User-LLM", "0.2500"]
            and popular.split() == ["most", "popular", "0.0625"])

"""The training loop (common.train via train_encoder.py): exact resume, DDP == one process, NaN stop, config errors,
and the learning checks on the synthetic default against its oracle."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import data
import sources
import eval as evaluation
import train_encoder
import train_llm
from common import TRAIN_DEFAULTS, Context, Selection, adamw, configure, load_checkpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small synthetic dataset (300 users) for the mechanics tests."""
    tmp = tmp_path_factory.mktemp("small")
    return data.prepare(data.config(n_users=300, n_items=100, n_genres=6, raw_dir=str(tmp / "raw"),
                                    out_dir=str(tmp / "prep")))


def run_encoder(data_dir, out_dir, *args):
    train_encoder.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--n_layer=1", "--n_embd=32",
                        "--feature_dims=(16, 8, 8)", "--batch_size=16", "--eval_examples=32", "--log_interval=1",
                        *args])


def log_rows(out_dir):
    """log.jsonl without the clock fields."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("units_per_s", "cpu_s")} for line in f]


def losses(out_dir):
    return {r["step"]: r["loss"] for r in log_rows(out_dir) if "loss" in r}


@pytest.mark.parametrize("kind", ["ar", "bert4rec"])
def test_resume_is_exact(small, tmp_path, kind):
    """6 steps == 3 steps + kill + resume + 3 steps, bit for bit (dropout on, and Bert4Rec's random masks), with
    the same log: no step twice, no validation lost; a killed save's temporary file is removed."""
    common = ["--dropout=0.2", "--lr_decay_steps=6", "--eval_interval=3", "--warmup_steps=2", f"--kind={kind}"]
    run_encoder(small, tmp_path / "a", "--max_steps=6", *common)
    run_encoder(small, tmp_path / "b", "--max_steps=3", *common)
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # a run killed after logging step 4, mid-save of a checkpoint
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n")
    (tmp_path / "b" / "ckpt.pt.tmp4242").write_bytes(b"half a checkpoint")
    run_encoder(small, tmp_path / "b", "--max_steps=6", "--init_from=resume", *common)
    a, b = (load_checkpoint(str(tmp_path / x / "ckpt.pt")) for x in "ab")
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert log_rows(tmp_path / "a") == log_rows(tmp_path / "b")
    assert [r["step"] for r in log_rows(tmp_path / "a") if "val_loss" in r] == [0, 3, 6]
    assert sorted(os.listdir(tmp_path / "b")) == ["best.pt", "ckpt.pt", "config.json", "log.jsonl"]


def test_validation_does_not_change_training(small, tmp_path):
    """How often a run validates changes none of its training steps: validation's random draws (Bert4Rec's cloze
    masks in its loss) are seeded apart from training's."""
    common = ["--kind=bert4rec", "--dropout=0.2", "--max_steps=6", "--warmup_steps=2"]
    run_encoder(small, tmp_path / "a", "--eval_interval=3", *common)
    run_encoder(small, tmp_path / "b", "--eval_interval=1", *common)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_refuses_an_optimizer_state_of_other_parameter_groups(small, tmp_path):
    """Resuming with the parameters split differently (here the seen bias's own learning rate; in train_llm.py
    another strategy) is a one-line error, not a traceback."""
    run_encoder(small, tmp_path / "a", "--max_steps=1", "--seen_bias=True", "--seen_bias_lr_mult=1.0")
    with pytest.raises(SystemExit, match="optimizer state does not fit this run's trained parameters"):
        run_encoder(small, tmp_path / "a", "--max_steps=2", "--seen_bias=True", "--init_from=resume")


def test_nothing_is_written_before_the_config_is_valid(small, tmp_path):
    with pytest.raises(SystemExit, match="init_from must be 'scratch' or 'resume', got 'latest'"):
        run_encoder(small, tmp_path / "a", "--init_from=latest")
    with pytest.raises(SystemExit, match="init_from='resume' but .*b/ckpt.pt does not exist"):
        run_encoder(small, tmp_path / "b", "--init_from=resume")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_checkpoint_is_used_only_with_its_own_data(small, tmp_path, capsys):
    """eval.py (and train_llm.py's encoder_ckpt/llm_ckpt, and resume) refuse data the checkpoint was not trained on,
    and find the data from any working directory (the path is stored absolute)."""
    other = data.prepare(data.config(n_users=120, n_items=60, n_genres=4, raw_dir=str(tmp_path / "raw"),
                                     out_dir=str(tmp_path / "other")))
    run_encoder(small, tmp_path / "enc", "--max_steps=1")
    ckpt = f"--ckpt={tmp_path / 'enc' / 'best.pt'}"
    with pytest.raises(SystemExit, match=r"best.pt was trained on .*prep \(300 users.*, not on .*other \(120 users"):
        evaluation.main([ckpt, f"--data_dir={other}"])
    with pytest.raises(SystemExit, match=r"ckpt.pt was trained on .*prep .*, not on .*other"):
        run_encoder(other, tmp_path / "enc", "--max_steps=2", "--init_from=resume")
    with pytest.raises(SystemExit, match=r"best.pt was trained on .*prep .*, not on .*other"):
        train_llm.main([f"--data_dir={other}", f"--encoder_ckpt={tmp_path / 'enc' / 'best.pt'}",
                        f"--out_dir={tmp_path / 'llm'}", "--max_steps=0"])
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert evaluation.main([ckpt])["ar encoder"]["recall@10"] >= 0  # the stored path, from another directory
    finally:
        os.chdir(cwd)
    with pytest.raises(SystemExit, match=r"--data_dir=.*nowhere holds no prepared dataset.*point --data_dir="):
        evaluation.main([ckpt, f"--data_dir={tmp_path / 'nowhere'}"])


@pytest.mark.parametrize("script", ["data", "train_encoder", "train_llm", "eval", "flops"])
def test_every_script_answers_help(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and module.__doc__.strip().splitlines()[0] in out and "--seed" in out


TINY_RUNS = {  # the same global batch (16), split in 2 micro-batches: one per rank under torchrun; dropout on
    "encoder": ["train_encoder.py", "--n_layer=1", "--n_embd=32", "--feature_dims=(16, 8, 8)", "--dropout=0.1",
                "--eval_examples=300"],  # validation spans two batches: one for each rank
    # Bert4Rec: random cloze masks in training and in validation's loss
    "bert4rec": ["train_encoder.py", "--kind=bert4rec", "--n_layer=1", "--n_embd=32", "--feature_dims=(16, 8, 8)",
                 "--dropout=0.1", "--eval_examples=300"],
    # User-LLM, Full, with the encoder's pretraining heads in the model: every trained parameter must get a gradient
    "llm": ["train_llm.py", "--n_layer=1", "--n_embd=32", "--n_head=2", "--enc_n_embd=16", "--enc_n_layer=1",
            "--enc_n_head=2", "--enc_feature_dims=(8, 4, 4)", "--seq_len=10", "--strategy=full", "--eval_examples=64",
            "--dropout=0.1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", TINY_RUNS)
def test_two_processes_equal_one(small, tmp_path, script):
    """torchrun --nproc_per_node=2 computes what one process computes: same global batches, same losses."""
    name, *shape = TINY_RUNS[script]
    args = [os.path.join(ROOT, name), f"--data_dir={small}", *shape, "--batch_size=16", "--log_interval=1",
            "--max_steps=4", "--eval_interval=2", "--grad_accum=2", "--warmup_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count, so the same summation order in every matmul
    # --standalone: torchrun picks a free port (a fixed one can still be held by the previous case's processes)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for cmd, out in (([sys.executable], "one"), (torchrun, "two")):
        r = subprocess.run([*cmd, *args, f"--out_dir={tmp_path / out}"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert log_rows(tmp_path / "one") == log_rows(tmp_path / "two")  # every loss and validation line, exactly
    assert set(losses(tmp_path / "one")) == {1, 2, 3, 4}
    a, b = (load_checkpoint(str(tmp_path / x / "ckpt.pt")) for x in ("one", "two"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the same gradient, not half of it
    moments = [(a["optimizer"]["state"][0][k], b["optimizer"]["state"][0][k]) for k in ("exp_avg", "exp_avg_sq")]
    assert all(torch.equal(x, y) for x, y in moments)


class Exploding(nn.Module):
    """A toy model whose loss turns NaN at the 4th training step."""

    def __init__(self):
        super().__init__()
        self.w, self.calls = nn.Parameter(torch.ones(2)), 0

    def forward(self, batch):
        self.calls += 1
        return self.w.sum() * (float("nan") if self.calls >= 4 else 1.0)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    cfg = configure(TRAIN_DEFAULTS, [f"--out_dir={tmp_path}", "--max_steps=10", "--eval_interval=2",
                                     "--warmup_steps=1"])
    model = Exploding()
    ctx = Context(0, 0, 1, torch.device("cpu"), torch.float32)
    with pytest.raises(SystemExit):
        train(cfg, ctx, model, adamw(model, 0.1, 0.0), global_batch=lambda s: torch.zeros(4).numpy(),
              make_batch=lambda ids: None, evaluate=lambda m: {"score": 0.0}, select=Selection("score"), extra={})
    assert "loss is nan at step 3" in capsys.readouterr().out
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 2 and torch.isfinite(ckpt["model"]["w"]).all()


def test_config_typo_fails_naming_the_key(small):
    with pytest.raises(SystemExit, match="unknown key 'n_layers'.*'n_layer'"):
        train_encoder.main([f"--data_dir={small}", "--n_layers=2"])
    with pytest.raises(SystemExit, match="config: kind must be one of"):
        train_encoder.main([f"--data_dir={small}", "--kind=gru", "--max_steps=0"])


def evaluate(out_dir, data_dir):
    return evaluation.main([f"--ckpt={out_dir}/best.pt", f"--data_dir={data_dir}"])


@pytest.mark.slow
def test_ar_encoder_approaches_the_oracle(synthetic, pretrained_encoder):
    """Sec 3.1's encoder on data with a known answer: >= 80% of the oracle's test Recall@10, far above most-popular."""
    rows = evaluate(pretrained_encoder, synthetic)
    oracle = sources.oracle_recall(data.UserData(synthetic), "test", ks=(10,))["recall@10"]
    model, popular = rows["ar encoder"]["recall@10"], rows["most popular"]["recall@10"]
    assert model >= 0.8 * oracle, (model, oracle)
    assert model > 4 * popular, (model, popular)


@pytest.mark.slow
@pytest.mark.parametrize("kind,steps", [("bert4rec", 200), ("dual", 400)])
def test_baseline_encoders_beat_most_popular(synthetic, tmp_path, kind, steps):
    """The paper's baseline encoders (Table 2) learn too: a short run already beats most-popular clearly."""
    train_encoder.main([os.path.join(ROOT, "configs/synthetic_enc.py"), f"--data_dir={synthetic}",
                        f"--out_dir={tmp_path}",
                        f"--kind={kind}", f"--max_steps={steps}", f"--eval_interval={steps}", "--eval_examples=500"])
    rows = evaluate(tmp_path, synthetic)
    assert rows[f"{kind} encoder"]["recall@10"] > 1.5 * rows["most popular"]["recall@10"]

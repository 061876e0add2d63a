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
import eval as evaluation
import train_encoder
from common import TRAIN_DEFAULTS, Context, adamw, configure, load_checkpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small synthetic dataset (300 users) for the mechanics tests."""
    tmp = tmp_path_factory.mktemp("small")
    return data.prepare(data.config(n_users=300, n_items=100, n_genres=6, raw_dir=str(tmp / "raw"), out_dir=str(tmp / "prep")))


def run_encoder(data_dir, out_dir, *args):
    train_encoder.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--n_layer=1", "--n_embd=32",
                        "--feature_dims=(16, 8, 8)", "--batch_size=16", "--eval_examples=32", "--log_interval=1", *args])


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_is_exact(small, tmp_path):
    """6 steps == 3 steps + resume + 3 steps, bit for bit (dropout on: the RNG state must be restored too)."""
    common = ["--dropout=0.2", "--lr_decay_steps=6", "--eval_interval=3", "--warmup_steps=2"]
    run_encoder(small, tmp_path / "a", "--max_steps=6", *common)
    run_encoder(small, tmp_path / "b", "--max_steps=3", *common)
    run_encoder(small, tmp_path / "b", "--max_steps=6", "--init_from=resume", *common)
    a, b = (load_checkpoint(str(tmp_path / x / "ckpt.pt")) for x in "ab")
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.mark.slow
def test_two_processes_equal_one(small, tmp_path):
    """torchrun --nproc_per_node=2 computes what one process computes: same global batches, same losses."""
    args = ["--max_steps=4", "--eval_interval=2", "--dropout=0.0", "--grad_accum=2", "--warmup_steps=1"]
    run_encoder(small, tmp_path / "one", *args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(ROOT, "train_encoder.py"), f"--data_dir={small}", f"--out_dir={tmp_path / 'two'}", "--n_layer=1",
           "--n_embd=32", "--feature_dims=(16, 8, 8)", "--batch_size=16", "--eval_examples=32", "--log_interval=1", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    assert all(abs(one[s] - two[s]) < 1e-5 for s in one)
    a, b = (load_checkpoint(str(tmp_path / x / "ckpt.pt")) for x in ("one", "two"))
    # Adam divides by sqrt(v): for near-zero gradients, summation-order rounding (~1e-7) grows to ~1e-4 in the update
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=5e-4) for k in a["model"])
    assert a["metrics"]["recall@10"] == pytest.approx(b["metrics"]["recall@10"])  # evaluation over all ranks


class Exploding(nn.Module):
    """A toy model whose loss turns NaN at the 4th training step."""

    def __init__(self):
        super().__init__()
        self.w, self.calls = nn.Parameter(torch.ones(2)), 0

    def forward(self, batch):
        self.calls += 1
        return self.w.sum() * (float("nan") if self.calls >= 4 else 1.0)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    cfg = configure(TRAIN_DEFAULTS, [f"--out_dir={tmp_path}", "--max_steps=10", "--eval_interval=2", "--warmup_steps=1"])
    model = Exploding()
    ctx = Context(0, 0, 1, torch.device("cpu"), torch.float32)
    with pytest.raises(SystemExit):
        train(cfg, ctx, model, adamw(model, 0.1, 0.0), global_batch=lambda s: torch.zeros(4).numpy(),
              make_batch=lambda ids: None, evaluate=lambda m: {"score": 0.0}, select="score", checkpoint_extra=dict)
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
    oracle = data.oracle_recall(data.UserData(synthetic), "test", 10)
    model, popular = rows["ar encoder"]["recall@10"], rows["most popular"]["recall@10"]
    assert model >= 0.8 * oracle, (model, oracle)
    assert model > 4 * popular, (model, popular)


@pytest.mark.slow
@pytest.mark.parametrize("kind,steps", [("bert4rec", 200), ("dual", 400)])
def test_baseline_encoders_beat_most_popular(synthetic, tmp_path, kind, steps):
    """The paper's baseline encoders (Table 2) learn too: a short run already beats most-popular clearly."""
    train_encoder.main([os.path.join(ROOT, "configs/synthetic_enc.py"), f"--data_dir={synthetic}", f"--out_dir={tmp_path}",
                        f"--kind={kind}", f"--max_steps={steps}", f"--eval_interval={steps}", "--eval_examples=500"])
    rows = evaluate(tmp_path, synthetic)
    assert rows[f"{kind} encoder"]["recall@10"] > 1.5 * rows["most popular"]["recall@10"]

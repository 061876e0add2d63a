"""Test setup and what several test files share. The GPT-2 tokenizer file ships in
../shared/tiktoken (no network here): tiktoken is pointed at it."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIKTOKEN_DIR = ROOT.parent / "shared" / "tiktoken"
sys.path.insert(0, str(ROOT))
if TIKTOKEN_DIR.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_DIR))

import pytest  # noqa: E402
import torch  # noqa: E402

CORES = torch.get_num_threads()


@pytest.fixture(autouse=True)
def seeded(request):
    """Every test starts from the same random state: no test passes or fails by luck of
    initialisation. Tests run on one thread, the learning checks (marked slow) on every core:
    threads buy nothing on tiny models, and on a busy machine they spin against each other (a tiny
    model's step was seen 50x slower)."""
    import numpy as np
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(CORES if request.node.get_closest_marker("slow") else 1)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """The embedded default, exactly as `python data.py` writes it (seconds)."""
    import data
    tmp = tmp_path_factory.mktemp("synthetic")
    return data.prepare(data.config(raw_dir=str(tmp / "raw"), out_dir=str(tmp / "prep")))


@pytest.fixture(scope="session")
def pretrained_encoder(synthetic, tmp_path_factory):
    """The demo's AR encoder (configs/synthetic_enc.py), pretrained for 450 of its 600 steps to keep
    the suite short (about 2 minutes; shared by the slow tests)."""
    import train_encoder
    torch.set_num_threads(CORES)  # the learning checks' shared fixture: every core
    out = tmp_path_factory.mktemp("encoder")
    train_encoder.main([str(ROOT / "configs" / "synthetic_enc.py"), f"--data_dir={synthetic}",
                        f"--out_dir={out}", "--max_steps=450", "--eval_interval=450"])
    return out


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """A small synthetic dataset (200 users, 80 items, 5 genres), loaded."""
    import data
    tmp = tmp_path_factory.mktemp("small")
    return data.UserData(data.prepare(data.config(n_users=200, n_items=80, n_genres=5,
                                                  raw_dir=str(tmp / "raw"),
                                                  out_dir=str(tmp / "prep"))))


@pytest.fixture(scope="session")
def small300(tmp_path_factory):
    """The folder of a small synthetic dataset (300 users) for the training mechanics tests."""
    import data
    tmp = tmp_path_factory.mktemp("small300")
    return data.prepare(data.config(n_users=300, n_items=100, n_genres=6, raw_dir=str(tmp / "raw"),
                                    out_dir=str(tmp / "prep")))


def tiny_llm(**kw):
    """A train_llm.py config of a tiny GPT and encoder (N = 10 events)."""
    from config import configure
    from userllm import DEFAULTS
    args = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--enc_n_embd=16", "--enc_n_layer=1",
            "--enc_n_head=2", "--enc_feature_dims=(8, 4, 4)", "--seq_len=10", "--n_latents=4",
            "--lora_rank=2"]
    return configure(DEFAULTS, args + [f"--{k}={v}" for k, v in kw.items()])


def count(module):
    return sum(p.numel() for p in module.parameters())


def trained(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def log_rows(out_dir):
    """A run's log.jsonl without the clock fields."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("units_per_s", "cpu_s")}
                for line in f]


def losses(out_dir):
    return {r["step"]: r["loss"] for r in log_rows(out_dir) if "loss" in r}


def run_twice(script, data_dir, tmp_path, *args, nproc=2):
    """The same run in one process and under torchrun --nproc_per_node=nproc (gloo, one thread
    each), with the global batch (16) split in nproc micro-batches, one per rank; returns the two
    out_dirs."""
    args = [str(ROOT / script), f"--data_dir={data_dir}", *args, "--batch_size=16",
            "--log_interval=1", "--max_steps=4", "--eval_interval=2", f"--grad_accum={nproc}",
            "--warmup_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same summation order in every matmul
    # --standalone: torchrun picks a free port (a fixed one can still be held by an earlier case's
    # processes)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}"]
    for cmd, out in (([sys.executable], "one"), (torchrun, "two")):
        r = subprocess.run([*cmd, *args, f"--out_dir={tmp_path / out}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path / "one", tmp_path / "two"


def assert_same_runs(one, two, exact=True):
    """Every loss and validation line, the final weights and Adam's moments: bit for bit (exact), or
    to float rounding (more than 2 ranks sum their gradients in another order than one process)."""
    from common import load_checkpoint
    same = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-4, atol=1e-6))
    rows = log_rows(one), log_rows(two)
    assert [sorted(r) for r in rows[0]] == [sorted(r) for r in rows[1]]
    assert all(same(torch.tensor([float(x[k]) for k in x]), torch.tensor([float(y[k]) for k in x]))
               for x, y in zip(*rows))
    assert set(losses(one)) == {1, 2, 3, 4}
    a, b = (load_checkpoint(str(x / "ckpt.pt")) for x in (one, two))
    # the same gradient, not half
    assert all(same(a["model"][k], b["model"][k]) for k in a["model"])
    moments = [(a["optimizer"]["state"][0][k], b["optimizer"]["state"][0][k])
               for k in ("exp_avg", "exp_avg_sq")]
    assert all(same(x, y) for x, y in moments)


def prep(tmp_path, name, **kw):
    """Prepare dataset `name` from tmp_path/raw into tmp_path/out and load it."""
    import data
    cfg = data.config(dataset=name, raw_dir=str(tmp_path / "raw"), out_dir=str(tmp_path / "out"),
                      **kw)
    return data.UserData(data.prepare(cfg))


@pytest.fixture(scope="session")
def syn(tmp_path_factory):
    """A synthetic dataset of 300 users of 20-60 events, loaded."""
    return prep(tmp_path_factory.mktemp("syn"), "synthetic", n_users=300, n_items=120, n_genres=8,
                min_len=20, max_len=60, seed=3)

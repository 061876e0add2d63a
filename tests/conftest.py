"""Test setup: the GPT-2 tokenizer file ships in ../shared/tiktoken (no network here); point tiktoken at it."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIKTOKEN_DIR = ROOT.parent / "shared" / "tiktoken"
sys.path.insert(0, str(ROOT))
if TIKTOKEN_DIR.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_DIR))

import torch  # noqa: E402

CORES = torch.get_num_threads()

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def seeded(request):
    """Every test starts from the same random state: no test passes or fails by luck of initialisation. Tests run on
    one thread, the learning checks (marked slow) on every core: threads buy nothing on tiny models, and on a busy
    machine they spin against each other (a tiny model's step was seen 50x slower)."""
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
    """The demo's AR encoder (configs/synthetic_enc.py), pretrained for 450 of its 600 steps to keep the suite short
    (about 2 minutes; shared by the slow tests)."""
    import train_encoder
    torch.set_num_threads(CORES)  # the learning checks' shared fixture: every core
    out = tmp_path_factory.mktemp("encoder")
    train_encoder.main([str(ROOT / "configs" / "synthetic_enc.py"), f"--data_dir={synthetic}", f"--out_dir={out}",
                        "--max_steps=450", "--eval_interval=450"])
    return out

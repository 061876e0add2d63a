"""Every config file resolves against its script's keys (a typo in a config is an error, so this
catches drift)."""
import glob
import os

import pytest

import data
import train_encoder
import train_llm
from config import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLM = {"ml20m_", "amazon_", "google_", "synthetic_llm", "synthetic_gpt", "ml100k_"}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_config_resolves(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs that build on a sibling open it relative to the repo root
    name = os.path.basename(path)
    script = train_llm if any(name.startswith(p) for p in LLM) else train_encoder
    cfg = configure(script.DEFAULTS, [path])
    assert cfg.dataset == "synthetic" or cfg.dataset in data.DATASETS
    assert cfg.out_dir.startswith("out/")

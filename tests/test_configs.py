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
LLM = {"ml20m_", "amazon_", "google_", "synthetic_llm", "synthetic_gpt", "ml100k_", "ml1m_"}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_config_resolves(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs that build on a sibling open it relative to the repo root
    name = os.path.basename(path)
    script = train_llm if any(name.startswith(p) for p in LLM) else train_encoder
    cfg = configure(script.DEFAULTS, [path])
    assert cfg.dataset == "synthetic" or cfg.dataset in data.DATASETS
    assert cfg.out_dir.startswith("out/")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_config_builds_its_model(path, small, monkeypatch):
    """Every config's model builds at its own shape (on the meta device: no memory), GPT-2 ones
    with random weights: a config whose prompt, soft prompt and events overflow the LLM's positions
    fails here, not on the GPUs."""
    import torch
    from encoder import encoder_config, make_encoder
    from userllm import build_model
    monkeypatch.chdir(ROOT)
    name = os.path.basename(path)
    with torch.device("meta"):
        if any(name.startswith(p) for p in LLM):
            cfg = configure(train_llm.DEFAULTS, [path])
            gpt2 = ["--random_weights=True"] if cfg.llm != "scratch" else []
            cfg = configure(train_llm.DEFAULTS, [path, "--encoder_ckpt=", "--llm_ckpt="] + gpt2)
            model = build_model(cfg, small, data.get_tokenizer("scratch"))
            assert model.llm.config.n_layer == (12 if gpt2 else cfg.n_layer)
        else:
            cfg = configure(train_encoder.DEFAULTS, [path])
            assert make_encoder(encoder_config(cfg, small.vocab_sizes)).cfg.n_layer == cfg.n_layer

"""gpt2.py: GPT-2 checkpoints load one-to-one (checked against a tiny random GPT-2 made by
transformers), the .safetensors reader needs no package, and offline a missing checkpoint is one
line saying where to put it."""
import os
import subprocess
import sys
import time

import pytest
import torch

from gpt2 import load_gpt2, read_safetensors

D = 8  # user-embedding width


def user_batch(B=3, M=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(B, M, D, generator=g)
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1, :2] = False  # row 1: two padded events (left padding, as data.batch gives)
    return user, mask


def test_read_safetensors_without_the_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).half(),
               "d": torch.randn(7).bfloat16(), "e": torch.zeros(0, 3)}
    st.save_file(tensors, tmp_path / "x.safetensors")
    got = read_safetensors(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)


@pytest.mark.parametrize("safe", [True, False])
def test_load_gpt2_matches_transformers(tmp_path, safe):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32,
                                                              vocab_size=100, n_positions=64,
                                                              bos_token_id=0,
                                                              eos_token_id=0)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=safe)
    if not (tmp_path / "pytorch_model.bin").exists() and not safe:
        # transformers >= 5 writes safetensors only; write the .bin the way the hub's gpt2 has it:
        # GPT2Model names (no "transformer." prefix) plus the causal-mask buffers attn.bias /
        # attn.masked_bias
        sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()
              if k != "lm_head.weight"}
        for i in range(2):
            sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(sd, tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
    idx = torch.randint(0, 100, (2, 17))
    with torch.no_grad():
        ref = hf(idx).logits
    ours = load_gpt2(str(tmp_path)).eval()
    torch.testing.assert_close(ours(idx)[0], ref, atol=1e-5, rtol=0)
    # new modules load untouched weights around them and start as the identity (gates at Flamingo's
    # 0)
    x = load_gpt2(str(tmp_path), d_user=D, lora_rank=2, dropout=0.0, gate_init=0.0).eval()
    user, mask = user_batch(B=2)
    torch.testing.assert_close(x(idx, user=user, user_mask=mask)[0], ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="n_layer"):
        load_gpt2(str(tmp_path), n_layer=4)


def test_load_gpt2_offline_fails_fast_with_one_line(tmp_path):
    env = dict(os.environ, NANOUSERLLM_CACHE=str(tmp_path / "cache"),
               NANOUSERLLM_HUB="http://127.0.0.1:9")
    # as a script reports it
    code = "import config, gpt2; config.cli(lambda argv: gpt2.load_gpt2('gpt2'))"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert time.time() - t0 < 30
    assert r.returncode == 1 and "Traceback" not in r.stderr
    msg = r.stderr.strip()
    assert "\n" not in msg and "config.json" in msg and "model.safetensors" in msg
    assert str(tmp_path / "cache" / "gpt2") in msg


def test_random_weights_is_gpt2s_shape_and_only_when_asked(small, monkeypatch, tmp_path):
    """random_weights=True builds GPT-2 small's shape (124,439,808 parameters, tied head) with
    nothing downloaded; without it, offline, the run stops in one line naming the option; with the
    scratch GPT it is refused, never ignored."""
    from config import UserError
    from conftest import tiny_llm
    from userllm import build_model
    monkeypatch.setenv("NANOUSERLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NANOUSERLLM_HUB", "http://127.0.0.1:9")
    with torch.device("meta"):  # shapes only: no memory, no time
        m = build_model(tiny_llm(llm="gpt2", random_weights=True, strategy="enc"), small, None)
    gpt = sum(p.numel() for n, p in m.llm.named_parameters() if not n.startswith("xattn."))
    assert gpt == 124_439_808 and m.llm.config.block_size == 1024 and len(m.llm.xattn) == 12
    with pytest.raises(UserError, match=r"cannot download gpt2 .*--random_weights=True\)$"):
        build_model(tiny_llm(llm="gpt2"), small, None)
    with pytest.raises(UserError, match="random_weights needs llm in gpt2"):
        build_model(tiny_llm(random_weights=True), small, None)


def test_stretched_positions_interpolate_gpt2s_table(tmp_path, small):
    """llm_positions above the checkpoint's stretch its learned position table linearly (position
    interpolation): the ends stay, position i of n reads position i * (P - 1) / (n - 1) of P, the
    rest of the model is untouched, and a prompt longer than P now runs. A config whose text
    outgrows the LLM's positions is one line naming the option; the scratch GPT refuses it."""
    transformers = pytest.importorskip("transformers")
    from config import UserError
    from conftest import tiny_llm
    from gpt2 import stretch_positions
    from userllm import build_model
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16,
                                                              vocab_size=50, n_positions=16))
    hf.save_pretrained(tmp_path)
    plain, long = load_gpt2(str(tmp_path)), load_gpt2(str(tmp_path), positions=46)
    w, s = plain.transformer.wpe.weight.detach(), long.transformer.wpe.weight.detach()
    assert s.shape == (46, 16) and long.config.block_size == 46
    torch.testing.assert_close(s[[0, 3, 45]], w[[0, 1, 15]])  # 3 * 15 / 45 = 1: on the grid
    torch.testing.assert_close(s[1], w[0] * 2 / 3 + w[1] / 3)  # between: the weighted neighbours
    torch.testing.assert_close(stretch_positions(w, 16), w)
    assert all(torch.equal(v, long.state_dict()[k]) for k, v in plain.state_dict().items()
               if k != "transformer.wpe.weight")
    idx = torch.randint(0, 50, (1, 40))
    assert long(idx)[0].shape == (1, 40, 50)
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        plain(idx)
    with torch.device("meta"):
        with pytest.raises(UserError, match=r"max_text_tokens=2000 exceeds the LLM's 1024 "
                                            r"positions: .* llm_positions=2000"):
            build_model(tiny_llm(llm="gpt2", random_weights=True, max_text_tokens=2000), small,
                        None)
        m = build_model(tiny_llm(llm="gpt2", random_weights=True, max_text_tokens=2000,
                                 llm_positions=2000), small, None)
        assert m.llm.config.block_size == 2000
        with pytest.raises(UserError, match=r"max_text_tokens=1020 \+ soft prompt 14 exceeds the "
                                            r"LLM's 1024 positions: .* llm_positions=1034"):
            build_model(tiny_llm(llm="gpt2", random_weights=True, fusion="soft_prompt",
                                 max_text_tokens=1020), small, None)  # 4 task tokens + 10 events
    with pytest.raises(UserError, match="llm_positions=2000 stretches GPT-2's"):
        build_model(tiny_llm(llm_positions=2000), small, None)

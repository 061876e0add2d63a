"""model.py: identity at init of gates and LoRA, padding invariance, KV cache, beam search, GPT-2 loading (Sec 3.2)."""
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from model import GPT, Block, GPTConfig, KVCache, LoRALinear, SoftPrompt, beam_search, generate
from userllm import load_gpt2, read_safetensors

D = 8  # user-embedding width in these tests


def tiny(**kw):
    return GPTConfig(**dict(block_size=64, vocab_size=61, n_layer=3, n_head=2, n_embd=16) | kw)


def twins(**kw):
    """A plain GPT and a GPT with the options in kw holding the same base weights."""
    torch.manual_seed(0)
    base = GPT(tiny()).eval()
    other = GPT(tiny(**kw)).eval()
    missing, unexpected = other.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("xattn." in k or "lora_" in k for k in missing)
    return base, other


def open_gates(model, value=1.0):
    for blk in model.xattn.values():
        blk.gate_attn.data.fill_(value), blk.gate_ff.data.fill_(value)


def user_batch(B=3, M=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(B, M, D, generator=g)
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1, :2] = False  # row 1: two padded events (left padding, as data.batch gives)
    return user, mask


def test_zero_gates_equal_base_llm_exactly():
    base, x = twins(d_user=D, xattn_every=2)
    assert sorted(x.xattn) == ["0", "2"]  # before LLM blocks 0 and 2 of 3
    idx = torch.randint(0, 61, (3, 10))
    user, mask = user_batch()
    assert torch.equal(x(idx, user=user, user_mask=mask)[0], base(idx)[0])
    open_gates(x, 0.5)
    assert not torch.allclose(x(idx, user=user, user_mask=mask)[0], base(idx)[0], atol=1e-3)


def test_gate_gradients_flow_at_zero():
    _, x = twins(d_user=D)
    idx = torch.randint(0, 61, (3, 10))
    user, mask = user_batch()
    _, loss = x(idx, idx, user=user, user_mask=mask)
    loss.backward()
    blk = x.xattn["0"]
    assert blk.gate_attn.grad.abs().item() > 0 and blk.gate_ff.grad.abs().item() > 0
    assert blk.attn.q.weight.grad.abs().max().item() == 0  # behind a zero gate: no gradient yet


def test_gates_started_off_zero_teach_the_cross_attention_from_the_first_step():
    """gate_init > 0 (the training recipe, userllm.DEFAULTS): the cross-attention gets a gradient at once, and the
    LLM's output is still the plain LLM's up to the gate's tiny contribution."""
    base, x = twins(d_user=D, gate_init=0.01)
    idx = torch.randint(0, 61, (3, 10))
    user, mask = user_batch()
    assert torch.allclose(x(idx, user=user, user_mask=mask)[0], base(idx)[0], atol=2e-3)  # gates at 0.5: 0.04
    assert not torch.equal(x(idx, user=user, user_mask=mask)[0], base(idx)[0])
    _, loss = x(idx, idx, user=user, user_mask=mask)
    loss.backward()
    assert x.xattn["0"].attn.q.weight.grad.abs().max().item() > 0  # compare test_gate_gradients_flow_at_zero


def test_lora_identity_at_init_perturb_and_merge():
    base, x = twins(lora_rank=4, lora_alpha=8.0, lora_mlp=True)
    assert sum(isinstance(m, LoRALinear) for m in x.modules()) == 4 * 3
    assert all("lora_" in n for n, p in x.named_parameters() if n.endswith(("lora_A", "lora_B")))
    idx = torch.randint(0, 61, (2, 12))
    assert torch.equal(x(idx)[0], base(idx)[0])
    torch.manual_seed(3)
    for m in x.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.data.normal_(0, 0.05)
    unmerged = x(idx)[0]
    assert not torch.allclose(unmerged, base(idx)[0], atol=1e-3)
    x.merge_lora()
    assert not any("lora_" in n for n in x.state_dict()) and x.config.lora_rank == 0
    assert set(x.state_dict()) == set(base.state_dict())  # a merged model saves as a plain GPT
    torch.testing.assert_close(x(idx)[0], unmerged, atol=1e-5, rtol=0)


def test_padded_events_never_change_cross_attention_output():
    _, x = twins(d_user=D)
    open_gates(x)
    idx = torch.randint(0, 61, (3, 9))
    user, mask = user_batch()
    ref = x(idx, user=user, user_mask=mask)[0]
    junk = torch.randn(3, 4, D) * 10
    off = torch.zeros(3, 4, dtype=torch.bool)
    for u, m in ((torch.cat([junk, user], 1), torch.cat([off, mask], 1)),
                 (torch.cat([user, junk], 1), torch.cat([mask, off], 1))):
        torch.testing.assert_close(x(idx, user=u, user_mask=m)[0], ref, atol=1e-6, rtol=0)
    # a real event in place of the junk does change the output (the test can fail)
    assert not torch.allclose(x(idx, user=torch.cat([junk, user], 1))[0], ref, atol=1e-4)


def test_padded_events_never_change_soft_prompt_output():
    torch.manual_seed(0)
    gpt, sp = GPT(tiny()).eval(), SoftPrompt(D, 16, n_task_tokens=3)
    idx = torch.randint(0, 61, (3, 9))
    user, mask = user_batch()
    ref = gpt(idx, prefix=sp(user, mask)[0], prefix_mask=sp(user, mask)[1])[0]
    junk, off = torch.randn(3, 4, D) * 10, torch.zeros(3, 4, dtype=torch.bool)
    for u, m in ((torch.cat([junk, user], 1), torch.cat([off, mask], 1)),
                 (torch.cat([user, junk], 1), torch.cat([mask, off], 1))):
        prefix, prefix_mask = sp(u, m)
        assert prefix.shape == (3, 3 + 9, 16) and prefix_mask.shape == (3, 12)
        torch.testing.assert_close(gpt(idx, prefix=prefix, prefix_mask=prefix_mask)[0], ref, atol=1e-5, rtol=0)
    assert not torch.allclose(gpt(idx, prefix=sp(torch.cat([junk, user], 1))[0])[0], ref, atol=1e-4)


def test_all_padding_user_is_finite_and_leaves_the_llm_unchanged():
    base, x = twins(d_user=D)
    open_gates(x)
    idx = torch.randint(0, 61, (3, 9))
    user, mask = user_batch()
    mask[2] = False
    logits, loss = x(idx, idx, user=user, user_mask=mask)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    torch.testing.assert_close(logits[2], base(idx)[0][2], atol=1e-6, rtol=0)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in x.parameters() if p.grad is not None)


def fusion_inputs(kind):
    """Model and keyword inputs for each way of feeding users: cross-attention or soft prompt, with padding."""
    user, mask = user_batch()
    if kind == "xattn":
        _, x = twins(d_user=D)
        open_gates(x)
        return x, dict(user=user, user_mask=mask)
    torch.manual_seed(0)
    prefix, prefix_mask = SoftPrompt(D, 16, 2)(user, mask)
    return GPT(tiny()).eval(), dict(prefix=prefix.detach(), prefix_mask=prefix_mask)


@pytest.mark.parametrize("kind", ["xattn", "soft_prompt"])
def test_cached_forward_and_generation_equal_uncached(kind):
    model, inputs = fusion_inputs(kind)
    idx = torch.randint(0, 61, (3, 20))
    full = model(idx, **inputs)[0]
    cache = KVCache(model.config.n_layer)
    steps = [model(idx[:, :8], cache=cache, **inputs)[0]]
    steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    out = generate(model, idx[:, :8], 10, **inputs)
    ref = idx[:, :8]
    for _ in range(10):  # uncached greedy: recompute everything for every token
        ref = torch.cat([ref, model(ref, **inputs)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


def sequence_logprob(model, prompt, tokens, inputs):
    """Sum of log p(tokens | prompt) from one uncached forward pass (prompt (1, T))."""
    seq = torch.cat([prompt, torch.tensor([tokens])], 1)
    logp = model(seq, **inputs)[0].log_softmax(-1)[0, prompt.size(1) - 1:-1]  # (n, V)
    return logp.gather(1, torch.tensor(tokens)[:, None]).sum().item()


def row(inputs, b):
    return {k: v[b:b + 1] for k, v in inputs.items()}


@pytest.mark.parametrize("kind", ["xattn", "soft_prompt"])
def test_beam_size_one_is_greedy(kind):
    model, inputs = fusion_inputs(kind)
    idx = torch.randint(0, 61, (3, 6))
    greedy = generate(model, idx, 7, **inputs)[:, 6:]
    beams = beam_search(model, idx, 1, 7, **inputs)
    for b in range(3):
        (tokens, score), = beams[b]
        assert tokens == greedy[b].tolist()
        assert math.isclose(score, sequence_logprob(model, idx[b:b + 1], tokens, row(inputs, b)), abs_tol=1e-4)


def test_beam_search_sorted_and_scores_match_forward():
    model, inputs = fusion_inputs("xattn")
    idx = torch.randint(0, 61, (3, 6))
    eos = generate(model, idx, 3, **inputs)[0, -1].item()  # greedy emits it at step 3 of row 0: some beams finish
    beams = beam_search(model, idx, 4, 6, eos=eos, **inputs)
    n_finished = 0
    for b in range(3):
        assert len(beams[b]) == 4 and len({tuple(t) for t, _ in beams[b]}) == 4
        scores = [s for _, s in beams[b]]
        assert scores == sorted(scores, reverse=True)
        for tokens, score in beams[b]:
            assert eos not in tokens[:-1]
            n_finished += tokens[-1] == eos
            assert math.isclose(score, sequence_logprob(model, idx[b:b + 1], tokens, row(inputs, b)), abs_tol=1e-4)
    assert n_finished > 0
    # the best hypothesis is at least as likely as greedy's (beam search explores a superset of greedy's path)
    greedy = beam_search(model, idx, 1, 6, eos=eos, **inputs)
    assert all(beams[b][0][1] >= greedy[b][0][1] - 1e-5 for b in range(3))


def test_beam_search_honours_allowed():
    model, inputs = fusion_inputs("soft_prompt")
    eos = 0
    catalogue = [[7, 8, 9, eos], [7, 3, eos], [11, eos], [12, 13, 14, 15, eos]]

    def allowed(rows):  # a prefix trie over the catalogue, the way eval.py constrains to item titles
        return [sorted({c[len(r)] for c in catalogue if c[:len(r)] == r}) for r in rows]

    idx = torch.randint(1, 61, (3, 6))
    beams = beam_search(model, idx, 3, 8, eos=eos, allowed=allowed, **inputs)
    for b in range(3):
        assert len(beams[b]) == 3 and all(t in catalogue for t, _ in beams[b])
        scores = [s for _, s in beams[b]]
        assert scores == sorted(scores, reverse=True)
        # the exact top 3 of the 4 catalogue items (the catalogue is small enough for beam 4 to score them all)
        exact = sorted((sequence_logprob(model, idx[b:b + 1], c, row(inputs, b)) for c in catalogue), reverse=True)
        for s, e in zip(scores, exact[:3]):
            assert math.isclose(s, e, abs_tol=1e-4)
    unconstrained = beam_search(model, idx, 3, 8, eos=eos, **inputs)
    assert any(t not in catalogue for b in unconstrained for t, _ in b)


def test_block_signature_unchanged():
    torch.manual_seed(0)
    block = Block(16, 2, 0.0, True, causal=False)
    x, mask = torch.randn(2, 6, 16), torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], dtype=torch.bool)
    y = block(x, key_mask=mask)
    torch.testing.assert_close(y[0, :4], block(x[:1, :4])[0], atol=1e-6, rtol=0)  # padding changes nothing


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
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100,
                                                              n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=safe)
    if not (tmp_path / "pytorch_model.bin").exists() and not safe:
        # transformers >= 5 writes safetensors only; write the .bin the way the hub's gpt2 has it: GPT2Model names
        # (no "transformer." prefix) plus the causal-mask buffers attn.bias / attn.masked_bias
        sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
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
    # new modules load untouched weights around them and start as the identity
    x = load_gpt2(str(tmp_path), d_user=D, lora_rank=2, dropout=0.0).eval()
    user, mask = user_batch(B=2)
    torch.testing.assert_close(x(idx, user=user, user_mask=mask)[0], ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="n_layer"):
        load_gpt2(str(tmp_path), n_layer=4)


def test_load_gpt2_offline_fails_fast_with_one_line(tmp_path):
    env = dict(os.environ, NANOUSERLLM_CACHE=str(tmp_path / "cache"), NANOUSERLLM_HUB="http://127.0.0.1:9")
    code = "import userllm; userllm.load_gpt2('gpt2')"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert time.time() - t0 < 30
    assert r.returncode == 1 and "Traceback" not in r.stderr
    msg = r.stderr.strip()
    assert "\n" not in msg and "config.json" in msg and "model.safetensors" in msg
    assert str(tmp_path / "cache" / "gpt2") in msg

"""model.py (Sec 3.2): the gates and LoRA start as the identity, gradients reach a gate at zero,
padded events change nothing, the shared Block's signature."""
import torch

from model import GPT, Block, GPTConfig, LoRALinear, SoftPrompt

D = 8  # user-embedding width in these tests


def tiny(**kw):
    """Flamingo's gates at 0 unless kw says otherwise (gate_init)."""
    return GPTConfig(**dict(block_size=64, vocab_size=61, n_layer=3, n_head=2, n_embd=16,
                            gate_init=0.0) | kw)


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
    """gate_init > 0 (the training recipe, userllm.DEFAULTS): the cross-attention gets a gradient at
    once, and the LLM's output is still the plain LLM's up to the gate's tiny contribution."""
    base, x = twins(d_user=D, gate_init=0.01)
    idx = torch.randint(0, 61, (3, 10))
    user, mask = user_batch()
    # gates at 0.5: 0.04
    assert torch.allclose(x(idx, user=user, user_mask=mask)[0], base(idx)[0], atol=2e-3)
    assert not torch.equal(x(idx, user=user, user_mask=mask)[0], base(idx)[0])
    _, loss = x(idx, idx, user=user, user_mask=mask)
    loss.backward()
    # compare test_gate_gradients_flow_at_zero
    assert x.xattn["0"].attn.q.weight.grad.abs().max().item() > 0


def test_lora_identity_at_init_then_perturbed():
    base, x = twins(lora_rank=4, lora_alpha=8.0, lora_mlp=True)
    assert sum(isinstance(m, LoRALinear) for m in x.modules()) == 4 * 3
    assert all("lora_" in n for n, p in x.named_parameters() if n.endswith(("lora_A", "lora_B")))
    idx = torch.randint(0, 61, (2, 12))
    assert torch.equal(x(idx)[0], base(idx)[0])
    torch.manual_seed(3)
    for m in x.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.data.normal_(0, 0.05)
    assert not torch.allclose(x(idx)[0], base(idx)[0], atol=1e-3)


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
        torch.testing.assert_close(gpt(idx, prefix=prefix, prefix_mask=prefix_mask)[0], ref,
                                   atol=1e-5, rtol=0)
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


def test_block_signature_unchanged():
    torch.manual_seed(0)
    block = Block(16, 2, 0.0, True, causal=False)
    x, mask = torch.randn(2, 6, 16), torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], dtype=torch.bool)
    y = block(x, key_mask=mask)
    # padding changes nothing
    torch.testing.assert_close(y[0, :4], block(x[:1, :4])[0], atol=1e-6, rtol=0)

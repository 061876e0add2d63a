"""userllm.py: the strategies train exactly their parameters (Sec 3.2.3), TextPrompt has no user
layers, a User-LLM starts from a trained GPT, the Dual Encoder's K embeddings feed the
cross-attention, and the per-event lookups repeat bit for bit."""
import pytest
import torch

import userllm
from common import save_checkpoint, to_device
from config import UserError, configure
from conftest import count, tiny_llm as tiny, trained
from data import Prompter, get_tokenizer
from userllm import build_model


def save_llm(path, state, data):
    """A train_llm.py checkpoint holding these weights, made on that data."""
    save_checkpoint({"model": state, "data": data, "config": {}, "llm_config": {}}, str(path))


@pytest.mark.parametrize("fusion", ["xattn", "soft_prompt"])
def test_each_strategy_trains_exactly_its_parameters(small, fusion):
    tok = get_tokenizer("scratch")
    for perceiver in (False, True):
        counts = {}
        for strategy in ("full", "lora", "enc", "proj"):
            m = build_model(tiny(fusion=fusion, strategy=strategy, perceiver=perceiver), small, tok)
            fusion_layers = count(m.llm.xattn) + (count(m.soft_prompt) if m.soft_prompt else 0) + \
                (count(m.perceiver) if m.perceiver else 0) + (count(m.recency) if m.recency else 0)
            # the Perceiver has its own
            assert (m.recency is not None) == (fusion == "xattn" and not perceiver)
            lora = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
            # the encoder's pretraining heads: the LLM's loss never reaches them
            heads = count(m.encoder.proj)
            counts[strategy] = trained(m)
            assert trained(m) == {"full": count(m) - heads,
                                  "lora": lora + count(m.encoder) - heads + fusion_layers,
                                  "enc": count(m.encoder) - heads + fusion_layers,
                                  "proj": fusion_layers}[strategy]
            assert (lora > 0) == (strategy == "lora")
            # DDP's condition: every trained parameter gets a gradient from the loss (a LoRA B
            # starts at 0, so its A's gradient is 0 at first, but it is there)
            targets = small.targets("train")[:4]
            batch = to_device(Prompter(small, tok, "next_item", 0, 64, 16)(small.batch(targets, 10),
                                                                           targets), "cpu")
            m.train()(batch).backward()
            assert not [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        assert (counts["full"] > counts["enc"] > counts["proj"] > 0
                and counts["lora"] > counts["enc"])


def test_textprompt_has_no_user_layers_and_refuses_enc(small):
    tok = get_tokenizer("scratch")
    m = build_model(tiny(fusion="none", strategy="full", text_events=5, encoder_ckpt="missing.pt"),
                    small, tok)
    assert (len(m.llm.xattn) == 0
            and m.soft_prompt is None and m.perceiver is None and m.encoder is None)
    assert trained(m) == count(m) == count(m.llm)
    with pytest.raises(UserError, match="fusion='none'"):
        build_model(tiny(fusion="none", strategy="enc"), small, tok)


@pytest.mark.parametrize("strategy", ["full", "lora", "enc", "proj"])
def test_user_llm_starts_from_a_trained_gpt(small, strategy, tmp_path):
    """llm_ckpt: the GPT of a run without user context becomes the 'pretrained LLM' of a User-LLM
    run. With its gates at 0 (and LoRA's B at 0) the new model computes exactly what that GPT does;
    a checkpoint of another GPT is an error."""
    # a fixed initialisation: the negative control below must not depend on luck
    torch.manual_seed(0)
    tok, targets, data = get_tokenizer("scratch"), small.targets("test")[:8], small.fingerprint()
    plain = build_model(tiny(fusion="none", strategy="full"), small, tok)
    save_llm(tmp_path / "plain.pt", plain.state_dict(), data)
    user = build_model(tiny(strategy=strategy), small, tok)
    userllm.load_llm(user, str(tmp_path / "plain.pt"), small)
    batch = to_device(Prompter(small, tok, "next_item", 0, 512, 64)(small.batch(targets, 10),
                                                                    targets), "cpu")
    with torch.no_grad():
        assert torch.allclose(user(batch), plain(batch), atol=1e-6)
        # the user now matters, and the GPT weights are the plain run's
        for gate in user.llm.xattn.values():
            gate.gate_attn.fill_(1.0)
            gate.gate_ff.fill_(1.0)
        logits = lambda m: m.llm(batch["idx"], **m.context(batch["hist"]))[0]
        assert (logits(user) - logits(plain)).abs().max() > 1e-2
    assert torch.equal(user.llm.transformer.wte.weight, plain.llm.transformer.wte.weight)
    other = build_model(tiny(fusion="none", strategy="full", n_embd=48), small, tok)
    save_llm(tmp_path / "other.pt", other.state_dict(), data)
    with pytest.raises(UserError, match="does not fit this model"):
        userllm.load_llm(user, str(tmp_path / "other.pt"), small)
    part = {k: v for k, v in plain.state_dict().items() if "h.1." not in k}
    save_llm(tmp_path / "part.pt", part, data)
    with pytest.raises(UserError, match="does not hold this model's GPT"):
        userllm.load_llm(user, str(tmp_path / "part.pt"), small)
    lora = build_model(tiny(fusion="none", strategy="lora"), small, tok)
    save_llm(tmp_path / "lora.pt", lora.state_dict(), data)
    if strategy != "lora":  # a LoRA run's adapters are never dropped silently
        with pytest.raises(UserError, match="no place for, e.g. .*lora_"):
            userllm.load_llm(user, str(tmp_path / "lora.pt"), small)
    other_data = {**data, "vocab_sizes": [500, 9, 11], "sha256": "0" * 16, "path": "/elsewhere"}
    save_llm(tmp_path / "foreign.pt", plain.state_dict(), other_data)
    with pytest.raises(UserError,
                       match="foreign.pt was trained on /elsewhere .*500/9/11.*, not on .*prep"):
        userllm.load_llm(user, str(tmp_path / "foreign.pt"), small)


def test_dual_encoder_cross_attention(small):
    """DualEnc-Xatten (Table 5): the LLM cross-attends to the Dual Encoder's K user embeddings
    instead of N events."""
    tok = get_tokenizer("scratch")
    enc = dict(vocab_sizes=small.vocab_sizes, feature_dims=(8, 4, 4), n_embd=16, n_layer=1,
               n_head=2, block_size=11, kind="dual", n_user_embs=3)
    m = build_model(tiny(strategy="enc"), small, tok, enc_cfg=enc)
    targets = small.targets("val")[:4]
    batch = to_device(Prompter(small, tok, "next_item", 0, 512, 64)(small.batch(targets, 10),
                                                                    targets), "cpu")
    assert m.context(batch["hist"])["user"].shape == (4, 3, 16)
    loss = m(batch)
    loss.backward()
    assert torch.isfinite(loss) and m.encoder.fusion[0].weight.grad is not None
    assert all(p.grad is not None for t in m.encoder.towers for p in t.parameters()
               if p.requires_grad)


@pytest.mark.parametrize("module", ["recency", "perceiver"])
def test_event_lookups_repeat_bit_for_bit_on_two_threads(module):
    """The gradient through the per-event lookups (model.Recency; the Perceiver's time embedding and
    read bias) is the same in every run on 2 threads (the quickstart's machine), so a seeded run
    repeats. Through tensor indexing, whose backward on CPU adds duplicate rows in a
    thread-dependent order, it was not: at the quickstart's shape (64 users x 50 events, 64 wide) 2
    threads gave a different gradient in 10 of 10 tries."""
    from model import Recency
    from perceiver import PerceiverResampler
    torch.set_num_threads(2)
    m = (Recency(50, 64) if module == "recency"
         else PerceiverResampler(64, n_latents=16, max_events=50))
    x = torch.randn(64, 50, 64)
    mask = torch.arange(50)[None] >= torch.randint(0, 40, (64, 1))  # left padding, as the data has
    out = m(x, mask)
    g = torch.randn_like(out[0] if isinstance(out, tuple) else out)

    def grads():
        m.zero_grad()
        out = m(x, mask)
        ((out[0] if isinstance(out, tuple) else out) * g).sum().backward()
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    first = grads()
    for _ in range(10):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))


def test_a_checkpoint_of_the_wrong_kind_is_one_line(small, tmp_path):
    """An LLM's checkpoint given as encoder_ckpt, an encoder's as llm_ckpt: named in one line."""
    tok = get_tokenizer("scratch")
    save_llm(tmp_path / "llm.pt", build_model(tiny(), small, tok).state_dict(), small.fingerprint())
    with pytest.raises(UserError, match="encoder_ckpt=.*llm.pt is a train_llm.py checkpoint, "
                                        "not an encoder's"):
        build_model(tiny(encoder_ckpt=str(tmp_path / "llm.pt")), small, tok)
    save_checkpoint({"model": {}, "config": {}, "encoder_config": {}}, str(tmp_path / "enc.pt"))
    with pytest.raises(UserError, match="llm_ckpt=.*enc.pt is a train_encoder.py checkpoint"):
        userllm.load_llm(build_model(tiny(), small, tok), str(tmp_path / "enc.pt"), small)


@pytest.mark.parametrize("key,value", [("xattn_every", 0), ("text_events", -1), ("fusion", "film"),
                                       ("strategy", "all"), ("lora_rank", 0), ("n_latents", 0)])
def test_llm_config_values_are_checked(key, value):
    with pytest.raises(UserError, match=f"^config: {key}={value!r} is not allowed: it must be"):
        configure(userllm.DEFAULTS, [f"--{key}={value}"], rules=userllm.RULES)


def test_last_events_hands_the_llm_the_latest_k_embeddings(small):
    """Truncation, the Perceiver's control (Table 6): with last_events=4 the LLM reads exactly the
    4 latest of the 10 events' embeddings, their recency included, from the same encoder."""
    tok = get_tokenizer("scratch")
    torch.manual_seed(0)
    full = build_model(tiny(), small, tok)
    last = build_model(tiny(last_events=4), small, tok)
    last.load_state_dict(full.state_dict())
    targets = small.targets("val")[:6]
    hist = to_device(small.batch(targets, 10), "cpu")["hist"]
    a, b = full.context(hist), last.context(hist)
    assert b["user"].shape == (6, 4, 16) and torch.equal(b["user"], a["user"][:, -4:])
    assert torch.equal(b["user_mask"], a["user_mask"][:, -4:])
    with pytest.raises(UserError, match="last_events=4 .* not with a Perceiver"):
        build_model(tiny(last_events=4, perceiver=True), small, tok)

"""flops.py (paper Table 3, Sec 4.4): the 6ND arithmetic, token counts against an independent count,
the FLOP counter against 6·params·tokens, and the Perceiver's saving in soft-prompt positions."""
import os
import types

import numpy as np
import pytest
import torch

import flops
from common import seeded_subset, six_nd, to_device
from conftest import TIKTOKEN_DIR
from data import QUERY, get_tokenizer
from userllm import DEFAULTS, build_model


def tokenizers():
    toks = {"bytes": get_tokenizer("scratch")}
    if TIKTOKEN_DIR.is_dir():
        toks["gpt2"] = get_tokenizer("gpt2")
    return toks


def tiny(**kw):
    """A train_llm.py config of a tiny GPT and encoder (N=50 events, 16 latents, as the paper)."""
    shape = dict(n_layer=2, n_head=2, n_embd=64, max_text_tokens=16, enc_n_embd=16, enc_n_layer=1,
                 enc_n_head=2, enc_feature_dims=(8, 4, 4), seq_len=50, n_latents=16,
                 n_task_tokens=4, strategy="full")
    return types.SimpleNamespace(**{**DEFAULTS, **shape, **kw})


def test_six_nd_reproduces_the_paper():
    assert ([round(flops.six_nd_reduction(t, 32), 1) for t in (700, 1350, 2500)]
            == [21.9, 42.2, 78.1])
    assert flops.six_nd(124e6, 1000) == pytest.approx(7.44e11)


def test_textprompt_tokens_equal_an_independent_count(small):
    for name, tok in tokenizers().items():
        rows = flops.token_table(small, {name: tok}, (5, 50), examples=12, seed=0)
        targets = seeded_subset(small.targets("test"), 12, 0)
        for row in rows:
            mine = [len(tok.encode_ordinary(f"History: {small.history_text(t, row['N'])}\n"
                                            + QUERY["next_item"]))
                    for t in targets]
            assert (row["textprompt_mean"] == pytest.approx(np.mean(mine))
                    and row["textprompt_max"] == max(mine))
            assert (row["userllm"] == len(tok.encode_ordinary(QUERY["next_item"]))
                    == row["userllm_max"])
            assert row["events"] == pytest.approx(np.mean([min(row["N"],
                                                               t - small.offsets[small.user_of(t)])
                                                           for t in targets]))


def test_textprompt_tokens_grow_with_n_while_user_llm_stays(small):
    rows = flops.token_table(small, tokenizers(), (50, 100, 200), examples=50, seed=0)
    for name in tokenizers():
        mine = [r for r in rows if r["tokenizer"] == name]
        tp = [r["textprompt_mean"] for r in mine]
        # the small dataset's users have up to ~120 events: TP200 shows more than TP100
        assert tp[0] < tp[1] < tp[2]
        assert len({r["userllm"] for r in mine}) == 1 and mine[0]["userllm"] < tp[0] / 10
    nd = flops.six_nd_table(rows)
    assert [round(r["paper_reduction"], 1) for r in nd[:3]] == [21.9, 42.2, 78.1]
    assert all(r["ours_reduction"] == pytest.approx(t["textprompt_mean"] / t["userllm"])
               for r, t in zip(nd, rows))


def test_flop_count_of_a_plain_gpt_is_6nd_plus_attention(small):
    """Tolerance 10% against 6·N·D with N = every GPT parameter: the counter also counts the
    attention scores (QK^T and AV: 4·L·T·C per token forward, 10·L·T·C backward as the counter's
    formula recomputes the scores; 4% here), which 6N leaves out, and N includes biases, LayerNorms
    and position embeddings that do no matmul (5% here). Exactly: 6 x matmul weights x tokens + the
    attention term."""
    tok = get_tokenizer("scratch")
    model = build_model(tiny(fusion="none"), small, tok)
    gpt, c = model.llm, model.llm.config
    B, T = 4, 16
    torch.manual_seed(0)
    idx = torch.randint(0, c.vocab_size, (B, T))
    batch = dict(idx=idx, targets=idx,
                 hist=to_device(small.batch(small.targets("test")[:B], 50), "cpu")["hist"])
    total, user = flops.count_flops(model, batch)
    assert user == 0  # TextPrompt has no user side
    # blocks + the (tied) lm_head
    matmul_weights = 12 * c.n_layer * c.n_embd ** 2 + c.vocab_size * c.n_embd
    attention = 14 * c.n_layer * B * T * T * c.n_embd
    assert total == pytest.approx(flops.six_nd(matmul_weights, B * T) + attention, rel=1e-3)
    assert total == pytest.approx(six_nd(sum(p.numel() for p in gpt.parameters()), B * T), rel=0.10)
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind


@pytest.mark.parametrize("fusion", ["soft_prompt", "xattn"])
def test_perceiver_cuts_user_positions_from_50_to_16(small, fusion):
    tok = get_tokenizer("scratch")
    hist = to_device(small.batch(small.targets("test")[:3], 50), "cpu")["hist"]
    without = flops.user_positions(build_model(tiny(fusion=fusion), small, tok), hist)
    with_p = flops.user_positions(build_model(tiny(fusion=fusion, perceiver=True), small, tok),
                                  hist)
    if fusion == "soft_prompt":
        assert (without, with_p) == ((4 + 50, 50), (4 + 16, 16))
    else:
        assert (without, with_p) == ((0, 50), (0, 16))


def test_cost_table_counts_the_user_side_and_textprompt_costs_more(small):
    cfg = types.SimpleNamespace(**{**flops.DEFAULTS, "n_layer": 1, "n_embd": 32, "n_head": 2,
                                   "enc_n_embd": 16, "enc_n_layer": 1, "enc_n_head": 2,
                                   "enc_feature_dims": (8, 4, 4), "n_latents": 4, "seq_len": 10,
                                   "batch_size": 2, "steps": 1, "gen_examples": 1})
    rows = {r["variant"]: r for r in flops.cost_table(cfg, small, get_tokenizer("scratch"))}
    tp, xattn, sp = (rows["TextPrompt TP10"], rows["User-LLM xattn"],
                     rows["User-LLM soft prompt + Perceiver"])
    assert (tp["user_gflops"] == 0 and xattn["user_gflops"] > 0
            and sp["user_gflops"] > xattn["user_gflops"])
    assert (tp["T"] > 5 * xattn["T"] and tp["gflops"] > xattn["gflops"]
            and (sp["P"], sp["M"]) == (4 + 4, 4))
    assert all(r["gflops"] == pytest.approx(r["llm_gflops"] + r["user_gflops"]) and r["ms_step"] > 0
               and r["ms_answer"] > 0 for r in rows.values())


def test_strategy_table_counts_what_each_strategy_trains(small):
    """Table 5: at GPT-2 small's shape a gated cross-attention block (attention from the user
    width D = 256, an FFW of 4C) holds 6,301,442 parameters, written out here; Proj trains exactly
    the fusion layers (and the recency embedding), Enc adds the encoder, LoRA the adapters, Full
    all but the encoder's pretraining heads; the narrow blocks are smaller."""
    cfg = types.SimpleNamespace(**{**flops.DEFAULTS, "seq_len": 10})
    rows = flops.strategy_table(cfg, small)
    C, D = 768, 256
    block = (2 * C + (C * C + C) + (D * 2 * C + 2 * C) + (C * C + C) + 1 + 2 * C
             + (8 * C * C + 5 * C) + 1)
    assert block == 6_301_442
    gpt2 = {(r["xattn"], r["strategy"]): r for r in rows if r["shape"].startswith("GPT-2")}
    assert round(gpt2["1, 0, 0", "proj"]["fusion"] * 1e6) == 12 * block
    assert round(gpt2["4, 0, 0", "proj"]["fusion"] * 1e6) == 3 * block
    recency = 11 * D  # one vector per recency of the 11 history positions
    for x in ("1, 0, 0", "4, 0, 0", "1, 192, 768", "4, 192, 768"):
        r = {s: gpt2[x, s] for s in ("full", "lora", "enc", "proj")}
        assert round((r["proj"]["trained"] - r["proj"]["fusion"]) * 1e6) == recency
        assert (r["full"]["trained"] > r["lora"]["trained"] > r["enc"]["trained"]
                > r["proj"]["trained"])
        assert r["full"]["all"] - r["full"]["trained"] < 0.01 * r["full"]["all"]  # the heads only
    assert gpt2["4, 192, 768", "proj"]["share"] < 0.05 < gpt2["1, 0, 0", "proj"]["share"]


def test_activation_bytes_count_what_backward_keeps_and_scale_with_the_batch(small):
    """Section 5's memory estimate: the bytes autograd saves, parameters excluded, double for twice
    the examples; the ML-20M encoder config at its own shape costs what its rows say."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 32)
    x = torch.randn(5, 16)
    _, n = flops.activation_bytes(lambda: torch.relu(lin(x)).sum(), list(lin.parameters()))
    assert n == 5 * 16 * 4 + 5 * 32 * 4  # the input (for the weight's gradient), relu's output
    _, n2 = flops.activation_bytes(lambda: torch.relu(lin(torch.cat([x, x]))).sum(),
                                   list(lin.parameters()))
    assert n2 == 2 * n
    r = flops.scale_row(os.path.join(flops.HERE, "configs", "ml20m.py"), small, examples=2)
    assert r["config"] == "ml20m.py" and r["trained"] == r["all"] and r["micro"] == 32768 // 32
    assert r["pflops"] == pytest.approx(r["gflops_example"] * 1e9 * 32768 * 10_000 / 1e15)
    assert r["state_gb"] == pytest.approx(16 * r["all"] * 1e6 / 1e9)

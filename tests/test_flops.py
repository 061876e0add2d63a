"""flops.py (paper Table 3, Sec 4.4): the 6ND arithmetic, token counts against an independent count, the FLOP counter
against 6·params·tokens, and the Perceiver's saving in soft-prompt positions."""
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import flops
from common import configure, seeded_subset, to_device
from data import QUERY, get_tokenizer
from userllm import DEFAULTS, build_model

ROOT = Path(__file__).resolve().parents[1]
TIKTOKEN_DIR = ROOT.parent / "shared" / "tiktoken"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flops")
    return data.UserData(data.prepare(data.config(n_users=200, n_items=80, n_genres=5, raw_dir=str(tmp / "raw"),
                                                  out_dir=str(tmp / "prep"))))


def tokenizers():
    toks = {"bytes": get_tokenizer("scratch")}
    if TIKTOKEN_DIR.is_dir():
        toks["gpt2"] = get_tokenizer("gpt2")
    return toks


def tiny(**kw):
    """A train_llm.py config of a tiny GPT and encoder (N=50 events, 16 latents, as the paper)."""
    shape = dict(n_layer=2, n_head=2, n_embd=64, max_text_tokens=16, enc_n_embd=16, enc_n_layer=1, enc_n_head=2,
                 enc_feature_dims=(8, 4, 4), seq_len=50, n_latents=16, n_task_tokens=4, strategy="full")
    return types.SimpleNamespace(**{**DEFAULTS, **shape, **kw})


def test_six_nd_reproduces_the_paper():
    assert [round(flops.six_nd_reduction(t, 32), 1) for t in (700, 1350, 2500)] == [21.9, 42.2, 78.1]
    assert flops.six_nd(124e6, 1000) == pytest.approx(7.44e11)


def test_textprompt_tokens_equal_an_independent_count(small):
    for name, tok in tokenizers().items():
        rows = flops.token_table(small, {name: tok}, (5, 50), examples=12, seed=0)
        targets = seeded_subset(small.targets("test"), 12, 0)
        for row in rows:
            mine = [len(tok.encode_ordinary(f"History: {small.history_text(t, row['N'])}\n" + QUERY["next_item"]))
                    for t in targets]
            assert row["textprompt_mean"] == pytest.approx(np.mean(mine)) and row["textprompt_max"] == max(mine)
            assert row["userllm"] == len(tok.encode_ordinary(QUERY["next_item"])) == row["userllm_max"]
            assert row["events"] == pytest.approx(np.mean([min(row["N"], t - small.offsets[small.user_of(t)])
                                                           for t in targets]))


def test_textprompt_tokens_grow_with_n_while_user_llm_stays(small):
    rows = flops.token_table(small, tokenizers(), (50, 100, 200), examples=50, seed=0)
    for name in tokenizers():
        mine = [r for r in rows if r["tokenizer"] == name]
        tp = [r["textprompt_mean"] for r in mine]
        assert tp[0] < tp[1] < tp[2]  # the small dataset's users have up to ~120 events: TP200 shows more than TP100
        assert len({r["userllm"] for r in mine}) == 1 and mine[0]["userllm"] < tp[0] / 10
    nd = flops.six_nd_table(rows)
    assert [round(r["paper_reduction"], 1) for r in nd[:3]] == [21.9, 42.2, 78.1]
    assert all(r["ours_reduction"] == pytest.approx(t["textprompt_mean"] / t["userllm"]) for r, t in zip(nd, rows))


def test_flop_count_of_a_plain_gpt_is_6nd_plus_attention(small):
    """Tolerance 10% against 6·N·D with N = every GPT parameter: the counter also counts the attention scores (QK^T
    and AV: 4·L·T·C per token forward, 10·L·T·C backward as the counter's formula recomputes the scores; 4% here),
    which 6N leaves out, and N includes biases, LayerNorms and position embeddings that do no matmul (5% here).
    Exactly: 6 x matmul weights x tokens + the attention term."""
    tok = get_tokenizer("scratch")
    model = build_model(tiny(fusion="none"), small, tok)
    gpt, c = model.llm, model.llm.config
    B, T = 4, 16
    torch.manual_seed(0)
    idx = torch.randint(0, c.vocab_size, (B, T))
    batch = dict(idx=idx, targets=idx, hist=to_device(small.batch(small.targets("test")[:B], 50), "cpu")["hist"])
    total, user = flops.count_flops(model, batch)
    assert user == 0  # TextPrompt has no user side
    matmul_weights = 12 * c.n_layer * c.n_embd ** 2 + c.vocab_size * c.n_embd  # blocks + the (tied) lm_head
    attention = 14 * c.n_layer * B * T * T * c.n_embd
    assert total == pytest.approx(flops.six_nd(matmul_weights, B * T) + attention, rel=1e-3)
    assert total == pytest.approx(flops.six_nd(gpt.num_params(), B * T), rel=0.10)
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind


@pytest.mark.parametrize("fusion", ["soft_prompt", "xattn"])
def test_perceiver_cuts_user_positions_from_50_to_16(small, fusion):
    tok = get_tokenizer("scratch")
    hist = to_device(small.batch(small.targets("test")[:3], 50), "cpu")["hist"]
    without = flops.user_positions(build_model(tiny(fusion=fusion), small, tok), hist)
    with_p = flops.user_positions(build_model(tiny(fusion=fusion, perceiver=True), small, tok), hist)
    if fusion == "soft_prompt":
        assert (without, with_p) == ((4 + 50, 50), (4 + 16, 16))
    else:
        assert (without, with_p) == ((0, 50), (0, 16))


def test_cost_table_counts_the_user_side_and_textprompt_costs_more(small):
    cfg = types.SimpleNamespace(**{**flops.DEFAULTS, "n_layer": 1, "n_embd": 32, "n_head": 2, "enc_n_embd": 16,
                                   "enc_n_layer": 1, "enc_n_head": 2, "enc_feature_dims": (8, 4, 4), "n_latents": 4,
                                   "seq_len": 10, "batch_size": 2, "steps": 1, "gen_examples": 1})
    rows = {r["variant"]: r for r in flops.cost_table(cfg, small, get_tokenizer("scratch"))}
    tp, xattn, sp = rows["TextPrompt TP10"], rows["User-LLM xattn"], rows["User-LLM soft prompt + Perceiver"]
    assert tp["user_gflops"] == 0 and xattn["user_gflops"] > 0 and sp["user_gflops"] > xattn["user_gflops"]
    assert tp["T"] > 5 * xattn["T"] and tp["gflops"] > xattn["gflops"] and (sp["P"], sp["M"]) == (4 + 4, 4)
    assert all(r["gflops"] == pytest.approx(r["llm_gflops"] + r["user_gflops"]) and r["ms_step"] > 0
               and r["ms_answer"] > 0 for r in rows.values())


def test_bench_dtype_times_fp32_and_bf16_at_a_tiny_shape():
    from encoder import EncoderConfig
    from model import GPTConfig
    cases = [flops.encoder_case("enc", EncoderConfig(vocab_sizes=(9, 5, 4), feature_dims=(8, 4, 4), n_embd=16,
                                                     n_layer=1, n_head=2, block_size=7), B=2),
             flops.gpt_case("gpt", GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=16, d_user=8),
                            B=2, T=5, M=3)]
    rows = flops.bench_dtype(cases, steps=1)
    assert [r["model"] for r in rows] == ["enc", "gpt"] and [r["units"] for r in rows] == ["12 events", "10 tokens"]
    assert all(r["fp32_ms"] > 0 and r["bf16_ms"] > 0 and r["speedup"] == r["fp32_ms"] / r["bf16_ms"] for r in rows)
    assert all(p.grad is None for c in cases for p in c["model"].parameters())


def test_gpu_check_command_lines_are_valid_configs():
    import train_encoder
    import train_llm
    runs = flops.gpu_check_runs(types.SimpleNamespace(**flops.DEFAULTS))
    assert [(r["run"], r["dtype"], r["compile"], r["steps"]) for r in runs] == [
        ("encoder", "bfloat16", True, 30), ("llm", "bfloat16", True, 30), ("llm-fp16", "float16", False, 10)]
    for r in runs:
        assert r["cmd"][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        script, args = r["cmd"][5], r["cmd"][6:]
        c = configure((train_llm if r["llm"] else train_encoder).DEFAULTS, [str(ROOT / args[0])] + args[1:])
        assert (c.dtype, c.compile, c.max_steps, c.out_dir) == (r["dtype"], r["compile"], r["steps"], r["out_dir"])
        assert c.eval_interval == c.max_steps and c.max_steps // c.log_interval == 3 and c.data_dir == ""
        if r["llm"]:
            assert script == "train_llm.py" and c.batch_size == 64 and c.encoder_ckpt == ""
            assert (c.llm, c.n_layer, c.n_head, c.n_embd, c.fusion, c.lr) == ("scratch", 12, 12, 768, "xattn", 6e-4)
        else:
            assert script == "train_encoder.py" and c.batch_size == 128


def test_mfu_and_peak_lookup():
    assert flops.peak_flops("NVIDIA H200") == flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12 and flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops("cpu") is None and flops.peak_flops("NVIDIA GeForce RTX 4090") is None
    assert flops.mfu(124e6, 1e6, 989e12) == pytest.approx(6 * 124e6 * 1e6 / 989e12)  # 75.2%
    assert flops.mfu(124e6, 1e6, None) is None


def test_logged_rate_skips_the_first_window(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"step": 0, "val_loss": 1.0}, {"step": 10, "units_per_s": 1.0},  # compile: slow
            {"step": 20, "units_per_s": 100.0}, {"step": 30, "units_per_s": 300.0}, {"step": 30, "val_loss": 0.9}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert flops.logged_rate(log) == pytest.approx(20 / (10 / 100 + 10 / 300))  # units over seconds: 150
    log.write_text(json.dumps({"step": 4, "units_per_s": 7.0}) + "\n")
    assert flops.logged_rate(log) == 7.0


def test_gpu_check_fails_loudly_and_kills_a_run_past_its_time(tmp_path, monkeypatch, capsys):
    def run(name, code):
        return dict(run=name, llm=False, cmd=[sys.executable, "-c", code], dtype="float32", compile=False,
                    steps=1, out_dir=str(tmp_path / name))
    monkeypatch.setattr(flops, "gpu_check_runs", lambda cfg: [
        run("bad", "print('boom'); raise SystemExit(3)"), run("slow", "import time; time.sleep(60)")])
    t0 = time.time()
    with pytest.raises(SystemExit, match=r"gpu check FAILED: bad \(exit 3\), slow \(timed out\)"):
        flops.main(["--gpu_check=True", f"--gpu_check_dir={tmp_path}", "--gpu_check_timeout=3",
                    f"--data_dir={tmp_path}"])
    assert time.time() - t0 < 20 and "boom" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_end_to_end_on_cpu(synthetic, tmp_path):
    """The whole check at a tiny shape, fp32 without compile: torchrun, both scripts, the fp16 GradScaler path (CPU
    autocast), log reading and the table."""
    rows = flops.main(["--gpu_check=True", "--gpu_check_steps=3", "--gpu_check_fp16_steps=1",
                       "--gpu_check_dtype=float32", "--gpu_check_compile=False", "--gpu_check_shape=(1, 2, 32)",
                       "--gpu_check_batch=(8, 4)", f"--gpu_check_dir={tmp_path}", f"--data_dir={synthetic}"])
    assert [(r["run"], r["status"], r["mfu"]) for r in rows] == [("encoder", "ok", "n/a"), ("llm", "ok", "n/a"),
                                                                  ("llm-fp16", "ok", "n/a")]
    assert all(r["units_per_s"] > 0 and r["params_m"] > 0 for r in rows)
    assert rows[1]["tokens_per_s"] > 10 * rows[1]["units_per_s"]  # examples/s x mean prompt + answer tokens


def test_encoder_table_counts_the_targets_the_loss_predicts(small):
    """targets/s: the AR encoder predicts the next event after each real history event, so targets/s is events/s times
    the batch's real fraction (counted here from the same batch); a DualEnc predicts one label per example."""
    config = str(ROOT / "configs" / "synthetic_enc.py")
    row, = flops.encoder_table(config, small, batch_size=16, steps=1, device=torch.device("cpu"))
    ids = seeded_subset(small.targets("train"), 16, 0)
    real = (small.batch(ids, 50)["hist"][0] != 0).sum()
    assert 0 < real < 16 * 50  # some padding: the two rates differ
    assert row["targets_per_s"] == pytest.approx(row["events_per_s"] * real / (16 * 50))
    assert row["examples_per_s"] == pytest.approx(row["events_per_s"] / 50)
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(kind="dual"))
    assert flops.supervised_targets(model, small.batch(ids, 50)) == 16

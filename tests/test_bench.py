"""bench.py: fp32 against bf16 timing, the GPU check's command lines, failures and plumbing (end to
end on CPU), MFU and peak lookup, the encoder throughput's target count, the preparation benchmark's
input."""
import json
import sys
import time
import types

import pytest
import torch

import bench
from common import peak_flops, seeded_subset
from config import UserError, configure
from conftest import ROOT


def test_bench_dtype_times_fp32_and_bf16_at_a_tiny_shape():
    from encoder import EncoderConfig
    from model import GPTConfig
    cases = [bench.encoder_case("enc", EncoderConfig(vocab_sizes=(9, 5, 4), feature_dims=(8, 4, 4),
                                                     n_embd=16, n_layer=1, n_head=2, block_size=7),
                                B=2),
             bench.gpt_case("gpt", GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2,
                                             n_embd=16, d_user=8),
                            B=2, T=5, M=3)]
    rows = bench.bench_dtype(cases, steps=1)
    assert ([r["model"] for r in rows] == ["enc", "gpt"]
            and [r["units"] for r in rows] == ["12 events", "10 tokens"])
    assert all(r["fp32_ms"] > 0 and r["bf16_ms"] > 0
               and r["speedup"] == r["fp32_ms"] / r["bf16_ms"] for r in rows)
    assert all(p.grad is None for c in cases for p in c["model"].parameters())


def test_gpu_check_command_lines_are_valid_configs():
    import train_encoder
    import train_llm
    runs = bench.gpu_check_runs(types.SimpleNamespace(**bench.DEFAULTS))
    assert [(r["run"], r["dtype"], r["compile"], r["steps"]) for r in runs] == [
        ("encoder", "bfloat16", True, 30), ("llm", "bfloat16", True, 30),
        ("llm-fp16", "float16", False, 10)]
    for r in runs:
        assert r["cmd"][1:5] == ["-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=1"]
        script, args = r["cmd"][5], r["cmd"][6:]
        c = configure((train_llm if r["llm"] else train_encoder).DEFAULTS,
                      [str(ROOT / args[0])] + args[1:])
        assert (c.dtype, c.compile, c.max_steps, c.out_dir) == (r["dtype"], r["compile"],
                                                                r["steps"], r["out_dir"])
        assert (c.eval_interval == c.max_steps and c.max_steps // c.log_interval == 3
                and c.data_dir == "")
        if r["llm"]:
            assert script == "train_llm.py" and c.batch_size == 64 and c.encoder_ckpt == ""
            assert (c.llm, c.n_layer, c.n_head, c.n_embd, c.fusion, c.lr) == ("scratch", 12, 12,
                                                                              768, "xattn", 6e-4)
        else:
            assert script == "train_encoder.py" and c.batch_size == 128


def test_mfu_and_peak_lookup():
    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert (peak_flops("NVIDIA H100 PCIe") == 756e12
            and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12)
    assert peak_flops("cpu") is None and peak_flops("NVIDIA GeForce RTX 4090") is None
    assert bench.mfu(124e6, 1e6, 989e12) == pytest.approx(6 * 124e6 * 1e6 / 989e12)  # 75.2%
    assert bench.mfu(124e6, 1e6, None) is None


def test_logged_rate_skips_the_first_window(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"step": 0, "val_loss": 1.0}, {"step": 10, "units_per_s": 1.0},  # compile: slow
            {"step": 20, "units_per_s": 100.0}, {"step": 30, "units_per_s": 300.0},
            {"step": 30, "val_loss": 0.9}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # units over seconds: 150
    assert bench.logged_rate(log) == pytest.approx(20 / (10 / 100 + 10 / 300))
    log.write_text(json.dumps({"step": 4, "units_per_s": 7.0}) + "\n")
    assert bench.logged_rate(log) == 7.0


def test_gpu_check_fails_loudly_and_kills_a_run_past_its_time(tmp_path, monkeypatch, capsys):
    def run(name, code):
        return dict(run=name, llm=False, cmd=[sys.executable, "-c", code], dtype="float32",
                    compile=False, steps=1, out_dir=str(tmp_path / name))
    monkeypatch.setattr(bench, "gpu_check_runs", lambda cfg: [
        run("bad", "print('boom'); raise SystemExit(3)"),
        run("slow", "import time; time.sleep(60)")])
    t0 = time.time()
    with pytest.raises(UserError, match=r"gpu check FAILED: bad \(exit 3\), slow \(timed out\)"):
        bench.main(["--gpu_check=True", f"--gpu_check_dir={tmp_path}", "--gpu_check_timeout=3",
                    f"--data_dir={tmp_path}"])
    assert time.time() - t0 < 20 and "boom" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_end_to_end_on_cpu(synthetic, tmp_path):
    """The whole check at a tiny shape, fp32 without compile: torchrun, both scripts, the fp16
    GradScaler path (CPU autocast), log reading and the table."""
    rows = bench.main(["--gpu_check=True", "--gpu_check_steps=3", "--gpu_check_fp16_steps=1",
                       "--gpu_check_dtype=float32", "--gpu_check_compile=False",
                       "--gpu_check_shape=(1, 2, 32)", "--gpu_check_batch=(8, 4)",
                       f"--gpu_check_dir={tmp_path}", f"--data_dir={synthetic}"])
    assert [(r["run"], r["status"], r["mfu"]) for r in rows] == [("encoder", "ok", "n/a"),
                                                                 ("llm", "ok", "n/a"),
                                                                 ("llm-fp16", "ok", "n/a")]
    assert all(r["units_per_s"] > 0 and r["params_m"] > 0 for r in rows)
    # examples/s x mean prompt + answer tokens
    assert rows[1]["tokens_per_s"] > 10 * rows[1]["units_per_s"]


def test_encoder_table_counts_the_targets_the_loss_predicts(small):
    """targets/s: the AR encoder predicts the next event after each real history event, so targets/s
    is events/s times the batch's real fraction (counted here from the same batch); a DualEnc
    predicts one label per example."""
    config = str(ROOT / "configs" / "synthetic_enc.py")
    row, = bench.encoder_table(config, small, batch_size=16, steps=1, device=torch.device("cpu"))
    ids = seeded_subset(small.targets("train"), 16, 0)
    real = (small.batch(ids, 50)["hist"][0] != 0).sum()
    assert 0 < real < 16 * 50  # some padding: the two rates differ
    assert row["targets_per_s"] == pytest.approx(row["events_per_s"] * real / (16 * 50))
    assert row["examples_per_s"] == pytest.approx(row["events_per_s"] / 50)
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(kind="dual"))
    assert bench.supervised_targets(model, small.batch(ids, 50)) == 16


def test_prepare_benchmark_small(tmp_path, capsys):
    """bench.py --prepare=True end to end on 3,000 events: the ml-20m-shaped input prepares
    whole."""
    cfg = configure(bench.DEFAULTS,
                    ["--prepare_events=3000", f"--prepare_dir={tmp_path}", "--seed=0"])
    r = bench.bench_prepare(cfg, seconds=0.05)
    assert (r['n_events'] == 3000 and r['n_users'] == 3000 * 138_493 // 20_000_263
            and [b['N'] for b in r['batch']] == [50, 200])
    ratings = (tmp_path / 'raw' / 'ratings.csv').read_bytes()
    assert ratings.startswith(b'userId,movieId,rating,timestamp\n') and ratings.count(b'\n') == 3001
    assert 'prepare: 3,000 events, 20 users' in capsys.readouterr().out


def test_bf16_on_a_cpu_without_it_says_so(monkeypatch, capsys):
    """Without native bf16, bench.py --dtype=True says why it skips (instead of running for hours),
    and a run asked for dtype=bfloat16 on such a CPU is told what it will cost."""
    import common
    monkeypatch.setattr(common.torch.cpu, "get_capabilities", lambda: {"avx2": True})
    monkeypatch.setattr(bench, "cpu_has_bf16", common.cpu_has_bf16)
    assert bench.main(["--dtype=True"]) == []
    assert "skipped. This CPU has no native bf16" in capsys.readouterr().out
    rt = common.setup("cpu", "bfloat16")
    assert rt.dtype == torch.bfloat16
    assert "warning: dtype=bfloat16 on a CPU without native bf16" in capsys.readouterr().out


def test_ranking_benchmark_feeds_fewer_tokens_searching(small, tmp_path, capsys):
    """bench.py --ranking=CKPT on a tiny untrained User-LLM: both rankings run on the seeded test
    users, scoring every title feeds exactly the trie's tokens per user, the search at most as
    many, and each row is set against its FLOP floor."""
    import train_llm
    from data import Prompter, get_tokenizer
    from decode import trie_chunks
    train_llm.main([f"--data_dir={small.path}", f"--out_dir={tmp_path}", "--max_steps=0",
                    "--n_layer=1", "--n_embd=32", "--n_head=2", "--enc_n_embd=16",
                    "--enc_n_layer=1", "--enc_n_head=2", "--enc_feature_dims=(8, 4, 4)",
                    "--seq_len=10", "--eval_examples=8"])
    cfg = configure(bench.DEFAULTS, [f"--ranking={tmp_path / 'best.pt'}", "--ranking_examples=6"])
    full, search = bench.bench_ranking(cfg)
    answers = Prompter(small, get_tokenizer("scratch"), "next_item", 0, 512, 64).answers[1:]
    nodes = sum(len(c.tokens) for c in trie_chunks(answers))
    assert full["tokens_user"] == nodes and 0 < search["tokens_user"] <= nodes
    assert all(0 < r["floor_s_user"]
               and r["of_floor"] == r["floor_s_user"] / r["cpu_s_user"] for r in (full, search))
    assert "6 test users" in capsys.readouterr().out


def test_length_groups_bench_times_the_same_examples_padded_less(small):
    rows = bench.main([f"--data_dir={small.path}", "--length_groups=4", "--length_batch=8",
                       "--length_cases=((3, 0), (0, 6))", "--threads=1"])
    stand_in = "stand-in reading 0-6 events"
    assert [(r["case"], r["batches"]) for r in rows] == [
        ("TP3", "as drawn"), ("TP3", "length-grouped"),
        (stand_in, "as drawn"), (stand_in, "length-grouped")]
    for drawn, grouped in (rows[:2], rows[2:]):
        assert grouped["real"] == drawn["real"]  # the same examples
        assert grouped["padded"] < drawn["padded"]  # each batch pads to its own longest
        assert grouped["speedup"] == drawn["ms_step"] / grouped["ms_step"] > 0

"""
Benchmarks (engineering, not the paper): throughput, precision and scale. Their numbers are in
docs/benchmarks.md.

    python bench.py --encoder=configs/ml100k.py --dataset=ml100k --batch_size=256 --threads=1
    python bench.py --dtype=True --threads=1   # fp32 against bf16 autocast on this CPU
    python bench.py --prepare=True             # data.py on a 20M-event MovieLens-format file
    python bench.py --ranking=out/synthetic-llm/best.pt --threads=1   # eval.py's ranking speed
    python bench.py --length_groups=16 --threads=1   # TextPrompt's step, batches length-grouped
    python bench.py --gpu_check=True           # on a GPU: both training scripts, bf16 + compile

- encoder: one train_encoder.py config's training step: examples/s, events/s, targets/s, FLOP/s,
  MFU.
- dtype: forward + backward of the demo encoder, the demo User-LLM's GPT and GPT-2 small in fp32 and
  bf16 autocast on the CPU (random weights and ids): why dtype=auto stays fp32 on a CPU.
- prepare: `python data.py --dataset=ml20m` on a generated ml-20m-shaped ratings.csv: seconds, peak
  memory, then batch assembly examples/s.
- ranking: eval.py's exact ranking of every title, by scoring the whole trie and by the top-10
  search, in CPU-seconds per user against the FLOP floor (tokens fed x FLOPs per token / matmul
  rate).
- length_groups: TextPrompt's training step (the synthetic stand-in's GPT, Fig. 3's max_text_tokens)
  on the batches of `length_groups` steps as drawn and length-grouped (data.length_grouped): CPU-ms
  per step and tokens per step, padded and real, averaged over the group's batches.
- gpu_check: train_encoder.py and train_llm.py (a GPT-2-small-shaped GPT from scratch) under
  torchrun, in bf16 with torch.compile and in fp16 (GradScaler); units/s from their log.jsonl and
  MFU = 6 x params x tokens/s / the GPU's dense bf16 peak. Exits 1 naming any run that fails. Its
  plumbing runs on a CPU: --gpu_check_dtype=float32 --gpu_check_compile=False
  "--gpu_check_shape=(1,2,32)" (tests/test_bench.py).
"""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import types

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import encoder
import userllm
from common import (checkpoint_data, cpu_has_bf16, cpu_sdpa_flops, load_checkpoint, peak_flops,
                    print_table, seeded_subset, six_nd, time_train_step, to_device)
from config import UserError, cli, configure
from data import (Prompter, UserData, batch_targets, by_prompt_length, get_tokenizer,
                  length_grouped)
from decode import answer_logprobs, top_answers, trie_chunks
from encoder import EncoderConfig, encoder_config, history_positions, make_encoder
from model import GPT, GPTConfig
from sources import generate_ml20m_shape
from userllm import build_model

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = vars(configure(userllm.DEFAULTS, [os.path.join(HERE, "configs", "synthetic_llm.py")]))
DEFAULTS = dict(
    dataset="synthetic", data_dir="", batch_size=128, steps=5, threads=0, seed=1337,
    encoder="",  # a train_encoder.py config: its training throughput
    dtype=False, gpt2_batch=2, gpt2_len=256,  # fp32 against bf16 autocast on the CPU
    prepare=False, prepare_events=20_000_000, prepare_dir="data/bench",  # preparation at scale
    ranking="", ranking_examples=200,  # a next-item train_llm.py checkpoint: ranking speed
    # TextPrompt's step, batches of this many steps as drawn and length-grouped; the histories
    # ((text_events, mixed_history) each) and the batch size
    length_groups=0, length_cases=((0, 50), (50, 0)), length_batch=64,
    # the GPU check: steps of the bf16 runs and of the fp16 one, their dtype and torch.compile, the
    # LLM's (n_layer, n_head, n_embd), (encoder, LLM) batch sizes, all runs' seconds in all, their
    # out_dirs
    gpu_check=False, gpu_check_steps=30, gpu_check_fp16_steps=10, gpu_check_dtype="bfloat16",
    gpu_check_compile=True, gpu_check_shape=(12, 12, 768), gpu_check_batch=(128, 64),
    gpu_check_timeout=450, gpu_check_dir="out/gpu_check",
)


# --------------------------------------------------------------------------------------------------
# encoder pretraining throughput (train_encoder.py)

def encoder_table(config_path, d, batch_size, steps, device):
    """Examples/s, events/s, supervised targets/s and achieved FLOP/s of one training step (forward,
    backward, AdamW) of a train_encoder.py config's encoder on dataset d; MFU against the device's
    peak where it is known."""
    c = configure(encoder.DEFAULTS, [config_path])
    model = make_encoder(encoder_config(c, d.vocab_sizes)).to(device)
    ids = seeded_subset(d.targets("train"), batch_size, 0)
    batch = to_device(d.batch(ids, c.seq_len), device)
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa_flops()) as counter:
        model(batch).backward()
    model.zero_grad(set_to_none=True)
    ms = time_train_step(model, batch, steps)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_flops(name)
    achieved, per_s = counter.get_total_flops() / (ms / 1000), 1000 / ms
    params = sum(p.numel() for p in model.parameters())
    return [dict(config=os.path.basename(config_path), params_m=params / 1e6, batch=len(ids),
                 N=c.seq_len, ms_step=ms, examples_per_s=len(ids) * per_s,
                 events_per_s=len(ids) * c.seq_len * per_s,
                 targets_per_s=supervised_targets(model, batch) * per_s,
                 gflops_per_s=achieved / 1e9, device=name,
                 mfu=f"{100 * achieved / peak:.1f}%" if peak else "n/a")]


def supervised_targets(model, batch):
    """Events a training step's loss predicts (each on every feature): the AR encoder's next event
    after every real history event (the last one's is the target), the Dual Encoder's one label per
    example, Bert4Rec's masked events (random: about mask_prob of the real events, the target
    included, at least one per sequence)."""
    real = (batch["hist"][0] != 0).sum(1)  # (B,) real history events per example
    if model.cfg.kind == "ar":
        return real.sum().item()
    if model.cfg.kind == "dual":
        return len(real)
    return (model.cfg.mask_prob * (real + 1)).clamp(min=1).sum().item()




# --------------------------------------------------------------------------------------------------
# fp32 against bf16 autocast on the CPU: what dtype=auto should pick there

SYNTHETIC_VOCABS = (501, 17, 11)  # data/synthetic's item, genre and rating ids, each + padding id 0
DEMO_T = 51  # the demo LLM's padded batch length: its 21-byte query + the longest title of 64


def encoder_case(name, cfg, B):
    """One train_encoder.py loss on B random full histories of cfg.block_size - 1 events; cfg an
    EncoderConfig."""
    model, N = make_encoder(cfg), cfg.block_size - 1
    batch = dict(hist=tuple(torch.randint(1, v, (B, N)) for v in cfg.vocab_sizes),
                 target=tuple(torch.randint(1, v, (B,)) for v in cfg.vocab_sizes))
    return dict(name=name, model=model, loss=lambda: model(batch), units=B * N, unit="events")


def gpt_case(name, cfg, B, T, M=50):
    """One GPT loss on B x T random token ids (targets: the ids); with cross-attention (cfg.d_user >
    0) over M random user embeddings, as User-LLM's GPT sees the encoder's output."""
    model, idx = GPT(cfg), torch.randint(0, cfg.vocab_size, (B, T))
    user = torch.randn(B, M, cfg.d_user) if cfg.d_user else None
    return dict(name=name, model=model, loss=lambda: model(idx, idx, user=user)[1], units=B * T,
                unit="tokens")


def dtype_cases(gpt2_batch, gpt2_len):
    """The three shapes compared, random weights and ids (no dataset): the demo encoder
    (configs/synthetic_enc.py, its batch), the demo User-LLM's GPT with its cross-attention
    (configs/synthetic_llm.py, its batch) and GPT-2 small (1024 positions, a shorter sequence to
    keep the CPU run short)."""
    e = configure(encoder.DEFAULTS, [os.path.join(HERE, "configs", "synthetic_enc.py")])
    enc = EncoderConfig(vocab_sizes=SYNTHETIC_VOCABS, feature_dims=e.feature_dims, n_embd=e.n_embd,
                        n_layer=e.n_layer, n_head=e.n_head, block_size=history_positions(e.seq_len))
    positions = DEMO["max_text_tokens"] + DEMO["n_task_tokens"] + DEMO["seq_len"]
    demo = GPTConfig(block_size=positions, vocab_size=257, n_layer=DEMO["n_layer"],
                     n_head=DEMO["n_head"], n_embd=DEMO["n_embd"], d_user=DEMO["enc_n_embd"])
    return [encoder_case("demo encoder", enc, e.batch_size),
            gpt_case("demo User-LLM GPT", demo, DEMO["batch_size"], DEMO_T, DEMO["seq_len"]),
            gpt_case("GPT-2 small", GPTConfig(), gpt2_batch, gpt2_len)]


def fwd_bwd_ms(model, loss_fn, dtype):
    """Wall-clock ms of one forward + backward under CPU autocast to dtype (float32: none). No
    optimizer step: AdamW runs on the fp32 weights whatever the autocast dtype."""
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return 1000 * (time.perf_counter() - t0)


def bench_dtype(cases, steps):
    """Table 5: per case, the median fp32 and bf16-autocast ms of a forward + backward, units/s in
    each, speedup = fp32 / bf16. One warmup step each, then the two dtypes alternate step by step,
    so a burst of load from other processes on a shared machine hits both alike."""
    rows = []
    for c in cases:
        times = {dt: [] for dt in (torch.float32, torch.bfloat16)}
        for i in range(steps + 1):
            for dt, ts in times.items():
                ms = fwd_bwd_ms(c["model"], c["loss"], dt)
                if i:  # step 0 warms up
                    ts.append(ms)
        fp32, bf16 = (statistics.median(ts) for ts in times.values())
        params = sum(p.numel() for p in c["model"].parameters())
        rows.append(dict(model=c["name"], params_m=params / 1e6,
                         units=f"{c['units']:,} {c['unit']}", fp32_ms=fp32, bf16_ms=bf16,
                         speedup=fp32 / bf16,
                         fp32_per_s=1000 * c["units"] / fp32, bf16_per_s=1000 * c["units"] / bf16))
    return rows


# --------------------------------------------------------------------------------------------------
# the GPU check: the training scripts themselves, bf16 + torch.compile and fp16 + GradScaler

def gpu_check_runs(cfg):
    """The runs, each the real script under torchrun (one process) from random init:
    configs/synthetic_enc.py's encoder; configs/synthetic_llm.py's User-LLM with a GPT of
    gpu_check_shape (GPT-2 small: no weights offline) and a random encoder (encoder_ckpt ''), in
    gpu_check_dtype, then in float16 without compile (the GradScaler path). Units/s are logged every
    third of a run and evaluation runs only at its start and end, so the windows after the first
    time training steps alone."""
    n_layer, n_head, n_embd = cfg.gpu_check_shape
    # GPT-2's learning rate, from random weights
    llm = ["--llm=scratch", f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}",
           "--encoder_ckpt=", "--llm_ckpt=", "--lr=6e-4", "--min_lr=6e-5"]
    enc_batch, llm_batch = cfg.gpu_check_batch
    data = [f"--data_dir={os.path.abspath(cfg.data_dir)}"] if cfg.data_dir else []  # data/synthetic
    dtype, compiled, steps = cfg.gpu_check_dtype, cfg.gpu_check_compile, cfg.gpu_check_steps
    enc_config, llm_config = "configs/synthetic_enc.py", "configs/synthetic_llm.py"
    runs = [("encoder", "train_encoder.py", enc_config, [], enc_batch, dtype, compiled, steps),
            ("llm", "train_llm.py", llm_config, llm, llm_batch, dtype, compiled, steps),
            ("llm-fp16", "train_llm.py", llm_config, llm, llm_batch, "float16", False,
             cfg.gpu_check_fp16_steps)]
    out = []
    for name, script, config, extra, batch, dtype, compiled, steps in runs:
        out_dir = os.path.join(os.path.abspath(cfg.gpu_check_dir), name)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               script, config, *data, *extra, f"--batch_size={batch}", f"--max_steps={steps}",
               f"--dtype={dtype}", f"--compile={compiled}", f"--log_interval={max(1, steps // 3)}",
               f"--eval_interval={steps}", "--eval_examples=256", f"--out_dir={out_dir}"]
        out.append(dict(run=name, llm=script == "train_llm.py", cmd=cmd, dtype=dtype,
                        compile=compiled, steps=steps, out_dir=out_dir))
    return out


def run_logged(cmd, log_path, timeout):
    """Run cmd in this folder, its output in log_path. Returns its exit code, or None when it ran
    past timeout: then its whole process group (torchrun and its worker) is killed, so no orphan
    keeps the GPU."""
    if timeout <= 0:
        return None
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return None


def log_tail(path, lines=15):
    """The last lines of a run's own output, tqdm's carriage returns as line breaks; torchrun's
    report of a failure (from its first line naming torch/distributed/elastic on) is cut, as it only
    repeats the exit code."""
    with open(path, errors="replace") as f:
        text = f.read().replace("\r", "\n").splitlines()
    cut = next((i for i, line in enumerate(text) if "torch/distributed/elastic" in line), len(text))
    return "\n".join(text[:cut][-lines:])


def logged_rate(log_path):
    """Units/s over the logged windows after the first (which holds torch.compile's compilation and
    the first evaluation), or of the only one: their units over their seconds, from each window's
    rate and length in steps. None when nothing was logged."""
    with open(log_path) as f:
        rows = [r for r in map(json.loads, f) if "units_per_s" in r]
    if not rows:
        return None
    steps = np.diff([0] + [r["step"] for r in rows])
    rates = np.array([r["units_per_s"] for r in rows])
    k = 1 if len(rows) > 1 else 0
    return float(steps[k:].sum() / (steps[k:] / rates[k:]).sum())


def run_shape(out_dir, llm):
    """(parameters, LLM input tokens per example or None for the encoder) of a run, from its
    config.json: the model rebuilt on the CPU and, for the LLM, the mean real (unpadded) prompt +
    answer positions over 1,000 seeded training examples (train.py logs examples/s, the batch's
    padded length varies)."""
    with open(os.path.join(out_dir, "config.json")) as f:
        c = types.SimpleNamespace(**json.load(f))
    d = UserData(c.data_dir or os.path.join(HERE, "data", c.dataset))
    if not llm:
        model = make_encoder(encoder_config(c, d.vocab_sizes))
        return sum(p.numel() for p in model.parameters()), None
    tok = get_tokenizer(c.llm)
    params = sum(p.numel() for p in build_model(c, d, tok).parameters())
    ids = seeded_subset(d.targets("train", c.min_history), 1000, c.seed)
    prompter = Prompter(d, tok, c.task, c.text_events, c.max_text_tokens, c.max_answer_tokens)
    answers = prompter.answer_tokens(ids, d.batch(ids, c.seq_len))
    lengths = [len(p) + len(a) - 1 for p, a in zip(prompter.prompts(ids), answers)]
    return params, float(np.mean(lengths))


def mfu(params, tokens_per_s, peak):
    """Model FLOPs utilisation: the 6·N·D training FLOPs per second over the device's peak (None:
    peak unknown). N is every parameter, D the real tokens (encoder: events), so attention scores,
    padding and, for User-LLM, the encoder's per-event work are left out: it understates what the
    device computes."""
    return six_nd(params, tokens_per_s) / peak if peak and tokens_per_s else None


def check_row(r, code, wall, peak):
    """One table row of a finished run; status 'ok' or why it failed."""
    row = dict(run=r["run"], dtype=r["dtype"], compile=str(r["compile"]), steps=r["steps"],
               wall_s=wall, unit="examples" if r["llm"] else "events", units_per_s=None,
               tokens_per_s=None,
               params_m=None, mfu="-")
    log = os.path.join(r["out_dir"], "log.jsonl")
    rate = logged_rate(log) if code == 0 and os.path.isfile(log) else None
    row["status"] = ("timed out" if code is None else f"exit {code}" if code else
                     "ok" if rate else "no units_per_s")
    if row["status"] == "ok":
        params, tokens = run_shape(r["out_dir"], r["llm"])
        row.update(units_per_s=rate, tokens_per_s=rate * (tokens or 1), params_m=params / 1e6)
        m = mfu(params, row["tokens_per_s"], peak)
        row["mfu"] = f"{100 * m:.1f}%" if m is not None else "n/a"
    return row


def gpu_check(cfg):
    """Prepare data/synthetic if missing (and no data_dir given), run gpu_check_runs one after
    another within gpu_check_timeout seconds in all, print the table (and write it to
    gpu_check_dir/summary.json). Exits 1, naming the failed runs and showing their output's tail,
    when any fails."""
    deadline, check_dir = time.time() + cfg.gpu_check_timeout, os.path.abspath(cfg.gpu_check_dir)
    os.makedirs(check_dir, exist_ok=True)
    default_data = os.path.join(HERE, "data", "synthetic", "meta.json")
    if not cfg.data_dir and not os.path.isfile(default_data):
        print("preparing data/synthetic: python data.py", flush=True)
        data_log = os.path.join(check_dir, "data.log")
        if run_logged([sys.executable, "data.py"], data_log, deadline - time.time()) != 0:
            raise UserError(f"gpu check FAILED: python data.py\n{log_tail(data_log)}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    for r in gpu_check_runs(cfg):
        print("torchrun " + " ".join(r["cmd"][3:]), flush=True)  # torch.distributed.run: torchrun
        shutil.rmtree(r["out_dir"], ignore_errors=True)  # start from an empty out_dir
        os.makedirs(r["out_dir"])
        t0 = time.time()
        code = run_logged(r["cmd"], os.path.join(r["out_dir"], "run.log"), deadline - time.time())
        rows.append(check_row(r, code, time.time() - t0, peak_flops(device)))
        if rows[-1]["status"] != "ok":
            print(f"{r['run']}: {rows[-1]['status']}; the end of {r['out_dir']}/run.log:\n"
                  f"{log_tail(os.path.join(r['out_dir'], 'run.log'))}", flush=True)
    print_table(rows, f"GPU check on {device}: training throughput (units/s after the first logged "
                "window) and MFU (6·params·tokens/s over the dense bf16 peak)",
                [("run", "run", ""), ("dtype", "dtype", ""), ("compile", "compile", ""),
                 ("steps", "steps", "d"), ("wall s", "wall_s", ".0f"),
                 ("units/s", "units_per_s", ",.0f"),
                 ("unit", "unit", ""), ("tokens/s", "tokens_per_s", ",.0f"),
                 ("params (M)", "params_m", ".1f"), ("MFU", "mfu", ""), ("status", "status", "")])
    with open(os.path.join(check_dir, "summary.json"), "w") as f:
        commands = [r["cmd"] for r in gpu_check_runs(cfg)]
        json.dump(dict(device=device, rows=rows, commands=commands), f, indent=2)
    if failed := [f"{r['run']} ({r['status']})" for r in rows if r["status"] != "ok"]:
        raise UserError(f"gpu check FAILED: {', '.join(failed)}")
    print("gpu check passed")
    return rows


# --------------------------------------------------------------------------------------------------
# data preparation at scale: data.py on an ml-20m-sized ratings.csv, then batch assembly

def bench_prepare(cfg, seconds=3):
    """Prepare time and peak memory on an ml-20m-shaped ratings.csv of prepare_events events
    (sources.generate_ml20m_shape, ML-20M's users per event; data.py in a fresh process, so
    generating the file doesn't count), then batch assembly examples/s at N=50 and 200, B=1024, each
    timed for `seconds`."""
    import resource
    raw, out = os.path.join(cfg.prepare_dir, "raw"), os.path.join(cfg.prepare_dir, "prepared")
    if not os.path.exists(os.path.join(raw, "ratings.csv")):
        t0 = time.time()
        n_users = max(1, cfg.prepare_events * 138_493 // 20_000_263)  # ML-20M's ratio
        generate_ml20m_shape(raw, n_users, 26_744, cfg.prepare_events, cfg.seed)
        print(f"wrote {os.path.join(raw, 'ratings.csv')} ({cfg.prepare_events:,} events) in "
              f"{time.time() - t0:.0f}s")
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "--dataset=ml20m",
                    f"--raw_dir={raw}", f"--out_dir={out}"], check=True)
    secs = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # KiB -> GiB
    d = UserData(out)
    train = d.targets("train")
    print(f"prepare: {d.meta['n_events']:,} events, {d.n_users:,} users in {secs:.1f}s, peak RSS "
          f"{peak:.2f} GiB; "
          f"{len(train):,} training examples")
    rows = []
    for N in (50, 200):
        batch_targets(train, 0, 1024, 0)  # the epoch's permutation: computed once per epoch
        step, t0 = 0, time.time()
        while time.time() - t0 < seconds:
            d.batch(batch_targets(train, step, 1024, 0), N)
            step += 1
        rows.append(dict(N=N, examples_per_s=step * 1024 / (time.time() - t0)))
        print(f"batch N={N}, B=1024: {rows[-1]['examples_per_s']:,.0f} examples/s (one core)")
    return dict(n_events=d.meta["n_events"], n_users=d.n_users, prepare_s=secs, peak_rss_gib=peak,
                batch=rows)


# --------------------------------------------------------------------------------------------------
# TextPrompt's training step: batches as drawn against length-grouped (data.length_grouped)

def bench_length_groups(cfg):
    """For each (text_events, mixed_history) case, on the stand-in GPT's shape with random weights:
    the training step (forward, backward, AdamW) on the `length_groups` batches of steps 0.. as
    drawn, then on the same examples length-grouped; CPU-ms per step and tokens per step, padded
    (what the step computes) and real, averaged over the batches."""
    d = UserData(cfg.data_dir or os.path.join("data", cfg.dataset))
    tok, train, rows = get_tokenizer("scratch"), d.targets("train"), []
    stand_in = os.path.join(HERE, "configs", "synthetic_gpt.py")
    for text_events, mixed in cfg.length_cases:
        c = configure(userllm.DEFAULTS, [stand_in, f"--text_events={text_events}",
                                         f"--mixed_history={mixed}", "--max_text_tokens=1664"])
        model = build_model(c, d, tok)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        prompter = Prompter(d, tok, c.task, text_events, c.max_text_tokens, c.max_answer_tokens,
                            mixed=mixed)
        drawn = [batch_targets(train, s, cfg.length_batch, cfg.seed)
                 for s in range(cfg.length_groups)]
        grouped = length_grouped(train, 0, cfg.length_batch, cfg.seed, cfg.length_groups,
                                 prompter.prompt_lengths)
        case = f"TP{text_events}" if text_events else f"stand-in reading 0-{mixed} events"
        for how, batches in (("as drawn", drawn), ("length-grouped", grouped)):
            cpu, padded, real = 0.0, 0, 0
            for ids in batches:
                batch = to_device(prompter(d.batch(ids, c.seq_len), ids), "cpu")
                padded += batch["idx"].numel()
                real += sum(prompter.prompt_lengths(ids))
                t0 = time.process_time()
                model(batch).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                cpu += time.process_time() - t0
            n = len(batches)
            rows.append(dict(case=case, batches=how, ms_step=1e3 * cpu / n, padded=padded / n,
                             real=real / n))
        rows[-1]["speedup"] = rows[-2]["ms_step"] / rows[-1]["ms_step"]
    print_table(rows, f"TextPrompt's training step, {cfg.length_groups} batches of "
                f"{cfg.length_batch}, torch threads {torch.get_num_threads()}",
                [("case", "case", ""), ("batches", "batches", ""),
                 ("CPU-ms/step", "ms_step", ".0f"), ("tokens/step", "padded", ",.0f"),
                 ("prompt tokens/step", "real", ",.0f"), ("speedup", "speedup", ".2f")])
    return rows


# --------------------------------------------------------------------------------------------------
# ranking every title by log-likelihood (eval.py): the search, scoring all, and the FLOP floor

def matmul_rate(n=2048, repeats=5):
    """This machine's fp32 matmul FLOP/s at the current thread count (best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def bench_ranking(cfg):
    """For a next-item train_llm.py checkpoint, on a seeded `ranking_examples` test users (batches
    of 32): CPU-seconds per user to rank every title by scoring the whole trie (eval.py
    --fast=False) and by the exact top-10 search (--fast=True), the tokens each feeds per user, and
    the floor: tokens x forward FLOPs per token (counted on a batch of prompts) / this machine's
    matmul rate."""
    ckpt = load_checkpoint(cfg.ranking)
    d = checkpoint_data(ckpt, cfg.ranking)
    tok = get_tokenizer(ckpt["config"]["llm"])
    tcfg, model = userllm.from_checkpoint(ckpt, cfg.ranking, d, tok)
    prompter = Prompter(d, tok, "next_item", tcfg.text_events, tcfg.max_text_tokens,
                        tcfg.max_answer_tokens)
    targets = seeded_subset(d.targets("test"), cfg.ranking_examples, cfg.seed)
    answers = prompter.answers[1:]
    chunks = trie_chunks(answers)
    fed = [0]  # tokens through the LLM, counted where each is embedded

    def count_tokens(module, args):
        fed[0] += args[0].numel()
    model.llm.transformer.wte.register_forward_pre_hook(count_tokens)
    rows, flops_token, prompts = [], None, prompter.prompts(targets)
    for name, rank in (("every title (--fast=False)", lambda idx, c: answer_logprobs(
                            model.llm, idx, c, answers, chunks)),
                       ("exact top 10 (--fast=True)", lambda idx, c: top_answers(
                            model.llm, idx, c, answers, k=10))):
        cpu, tokens = 0.0, 0
        for group in by_prompt_length(prompts, 32):
            batch = to_device(d.batch(targets[group], tcfg.seq_len), "cpu")
            idx = torch.tensor([prompts[i] for i in group])
            context = model.context(batch["hist"])
            if flops_token is None:
                with FlopCounterMode(display=False, custom_mapping=cpu_sdpa_flops()) as count:
                    model.llm(idx, **context)
                flops_token = count.get_total_flops() / idx.numel()
            fed[0], t0 = 0, time.process_time()
            rank(idx, context)
            cpu += time.process_time() - t0
            tokens += fed[0] - idx.numel()  # beyond the prompts themselves
        rows.append(dict(ranking=name, cpu_s_user=cpu / len(targets),
                         tokens_user=tokens / len(targets)))
    rate = matmul_rate()
    for r in rows:
        r["floor_s_user"] = r["tokens_user"] * flops_token / rate
        r["of_floor"] = r["floor_s_user"] / r["cpu_s_user"]
    nodes = sum(len(c.tokens) for c in chunks)
    print_table(rows, f"ranking {len(answers):,} titles ({nodes:,} trie nodes) for "
                f"{len(targets)} test users of {cfg.ranking}, torch threads "
                f"{torch.get_num_threads()}; forward {flops_token / 1e6:.2f} MFLOP per token, "
                f"matmul {rate / 1e9:.1f} GFLOP/s",
                [("ranking", "ranking", ""), ("CPU-s/user", "cpu_s_user", ".4f"),
                 ("tokens/user", "tokens_user", ",.0f"), ("floor s/user", "floor_s_user", ".4f"),
                 ("floor / measured", "of_floor", ".2f")])
    return rows


def main(argv):
    cfg = configure(DEFAULTS, argv, __doc__)
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(cfg.seed)
    if cfg.gpu_check:
        return gpu_check(cfg)
    if cfg.prepare:
        return bench_prepare(cfg)
    if cfg.ranking:
        return bench_ranking(cfg)
    if cfg.length_groups:
        return bench_length_groups(cfg)
    if cfg.dtype:
        if not cpu_has_bf16():
            print("bench.py --dtype=True: skipped. This CPU has no native bf16 (no avx512_bf16 or "
                  "amx_bf16 in torch.cpu.get_capabilities()), so bf16 autocast is emulated: its "
                  "matmuls run 10-100x slower than float32 and the timing would take hours")
            return []
        rows = bench_dtype(dtype_cases(cfg.gpt2_batch, cfg.gpt2_len), cfg.steps)
        caps = torch.cpu.get_capabilities()
        print_table(rows, f"forward + backward per step, fp32 against bf16 autocast, CPU "
                    f"{caps.get('cpu_name', '?')} (avx512_bf16 {caps.get('avx512_bf16')}, amx_bf16 "
                    f"{caps.get('amx_bf16')}), torch threads {torch.get_num_threads()}, median of "
                    f"{cfg.steps} steps",
                    [("model", "model", ""), ("params (M)", "params_m", ".2f"),
                     ("per step", "units", ""),
                     ("fp32 ms/step", "fp32_ms", ".1f"), ("bf16 ms/step", "bf16_ms", ".1f"),
                     ("speedup", "speedup", ".2f"), ("fp32 units/s", "fp32_per_s", ",.0f"),
                     ("bf16 units/s", "bf16_per_s", ",.0f")])
        return rows
    if cfg.encoder:
        d = UserData(cfg.data_dir or os.path.join("data", cfg.dataset))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows = encoder_table(cfg.encoder, d, cfg.batch_size, cfg.steps, device)
        print_table(rows, f"encoder training step (forward, backward, AdamW), data {d.path}",
                    [("config", "config", ""), ("params (M)", "params_m", ".2f"),
                     ("batch", "batch", "d"),
                     ("N", "N", "d"), ("ms/step", "ms_step", ".0f"),
                     ("examples/s", "examples_per_s", ",.0f"), ("events/s", "events_per_s", ",.0f"),
                     ("targets/s", "targets_per_s", ",.0f"), ("GFLOP/s", "gflops_per_s", ".1f"),
                     ("device", "device", ""), ("MFU", "mfu", "")])
        return rows
    raise UserError("bench.py: choose --encoder=CONFIG, --dtype=True, --prepare=True, "
                    "--ranking=CKPT, --length_groups=N or --gpu_check=True")


if __name__ == "__main__":
    cli(main)

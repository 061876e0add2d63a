"""
The paper's efficiency claims, measured (paper Table 3 and Sec 4.4): User-LLM hands the LLM a short fixed query and puts
the user history in embeddings, where TextPrompt spells the history out as text.

    python data.py && python flops.py                  # synthetic default, the demo's scratch GPT: < 1 min on CPU
    python flops.py --llm=gpt2 --random_weights=True --batch_size=2 --steps=2   # GPT-2 shapes (offline: set
                                                       # TIKTOKEN_CACHE_DIR to a folder holding r50k_base's file)
    python flops.py --encoder=configs/synthetic_enc.py --batch_size=128 --steps=5   # table 4 only
    python flops.py --bench_dtype=True --threads=1     # table 5 only: fp32 vs bf16 on the CPU, ~1 min, no dataset
    python flops.py --gpu_check=True                   # on a GPU: the training scripts in bf16 + compile, <= 8 min
    python flops.py --gpu_check=True --gpu_check_steps=6 --gpu_check_fp16_steps=3 --gpu_check_dtype=float32 \
        --gpu_check_compile=False "--gpu_check_shape=(1,2,32)" "--gpu_check_batch=(16,8)"   # its plumbing, CPU, 30 s
    python flops.py --bench_prepare=True               # 7 only: prepare 20M MovieLens-format events, batch examples/s

Three tables, printed and written as JSON to --out (default out/flops.json):
1. tokens (Table 3): LLM input tokens per example, TextPrompt TP-N (the last N events as text, then the query) for
   N = 50/100/200 vs User-LLM (the query only), measured on a seeded sample of test examples, with the GPT-2 tokenizer
   (tiktoken r50k_base; skipped with a note when it can't be loaded) and the scratch GPT's byte-level one.
2. the 6·N·D rule (Sec 4.4): training FLOPs ~ 6 x parameters x tokens, so on the same LLM the saving is the token
   ratio: the paper's 32 vs 700/1350/2500 tokens -> 21.9x/42.2x/78.1x, side by side with ours.
3. measured cost of one training step (forward + backward + AdamW) and of one generated answer, on one real training
   batch, for TextPrompt TP50 and User-LLM (cross-attention / soft prompt, each with and without the Perceiver
   50 -> 16), on the same GPT, *including* the user encoder and Perceiver that the paper's count leaves out.

The other modes print one table each:
4. one train_encoder.py config's training step: examples/s, events/s, targets/s, FLOP/s, MFU on a known GPU.
5. fp32 vs bf16 autocast on the CPU, forward + backward of the demo encoder, the demo User-LLM's GPT and GPT-2 small
   (random weights and ids): ms/step, units/s, speedup. It is why dtype=auto stays fp32 on the CPU (common.py).
6. the GPU check: train_encoder.py (configs/synthetic_enc.py) and train_llm.py (configs/synthetic_llm.py with a
   GPT-2-small-shaped GPT from scratch and a random encoder) under torchrun, in bf16 with torch.compile and in fp16
   (GradScaler), 30/10 steps within 450 s in all; units/s from their log.jsonl (encoder: events; LLM: examples, times
   the mean prompt + answer tokens) and MFU = 6 x params x tokens/s / the GPU's dense bf16 peak. Exits 1 if a run fails.
7. data preparation at scale: `python data.py --dataset=ml20m` on a generated bench_events-row ratings.csv shaped
   like ml-20m (under bench_dir, kept for reruns): seconds and peak memory, then batch assembly examples/s, B=1024.

FLOPs are counted by torch.utils.flop_counter (matmuls and attention; elementwise ops, softmax and LayerNorm are not
counted; attention is counted over the full T x T square, as the counter does for causal kernels on GPU too).
`--llm=gpt2 --random_weights=True`: a GPT-2-small-shaped model with random weights (GPT-2's weights aren't available
offline; FLOPs and time don't depend on weight values); the other GPT-2 sizes work the same way.

Dimension letters: B batch, T text tokens (padded batch length), P soft-prompt positions (n_task + M), M user
embeddings the LLM sees (N events, or the Perceiver's latents), N history events.
"""
import csv
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
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import encoder
import userllm
from common import adamw, configure, seeded_subset, to_device
from data import QUERY, Prompter, UserData, batch_targets, get_tokenizer
from encoder import EncoderConfig, encoder_config, history_positions, make_encoder
from model import GPT, GPTConfig, generate
from sources import GENRES, write_ratings_csv
from userllm import GPT2_NAMES, build_model

HERE = os.path.dirname(os.path.abspath(__file__))
# train_llm.py keys that set a model's shape; their defaults are the demo's (configs/synthetic_llm.py)
SHAPE_KEYS = ("seq_len", "n_layer", "n_head", "n_embd", "max_text_tokens", "n_latents", "perceiver_layers",
              "n_task_tokens", "enc_feature_dims", "enc_n_embd", "enc_n_layer", "enc_n_head", "xattn_every",
              "xattn_dim", "max_answer_tokens")
DEMO = vars(configure(userllm.DEFAULTS, [os.path.join(HERE, "configs", "synthetic_llm.py")]))
DEFAULTS = dict(
    dataset="synthetic", data_dir="", examples=200,  # table 1: test examples tokenized
    out="out/flops.json", llm="scratch", random_weights=False,  # random_weights: a GPT-2-shaped model, no download
    strategy="full",  # what trains in table 3 (6ND assumes all LLM weights train); TextPrompt: 'full' for enc/proj
    batch_size=8, steps=3, gen_examples=3,  # table 3: one training batch, timed steps (+1 warmup), answers timed
    threads=0, seed=1337,  # threads 0: every core this process may use (on a busy machine 1 times more steadily)
    encoder="",  # a train_encoder.py config: print only table 4, that encoder's training throughput
    bench_dtype=False, bench_gpt2_batch=2, bench_gpt2_len=256,  # table 5 only: fp32 vs bf16 autocast on the CPU
    bench_prepare=False, bench_events=20_000_000, bench_dir="data/bench",  # 7 only: prepare at scale (its raw files)
    # the GPU check only (see gpu_check): steps of the bf16 runs and of the fp16 one, their dtype and torch.compile,
    # the LLM's (n_layer, n_head, n_embd), (encoder, LLM) batch sizes, all runs' total seconds, their out_dirs
    gpu_check=False, gpu_check_steps=30, gpu_check_fp16_steps=10, gpu_check_dtype="bfloat16", gpu_check_compile=True,
    gpu_check_shape=(12, 12, 768), gpu_check_batch=(128, 64), gpu_check_timeout=450, gpu_check_dir="out/gpu_check",
    **{k: DEMO[k] for k in SHAPE_KEYS},
)
GPT2_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
               "gpt2-xl": (48, 25, 1600)}  # (n_layer, n_head, n_embd); all have 1024 positions
PAPER_TOKENS = {0: 32, 50: 700, 100: 1350, 200: 2500}  # Table 3: User-LLM's query (N=0 text events), TP50/100/200
# The counter has no formula for PyTorch's CPU attention kernel; count it as the GPU kernels are (T x T, fwd and bwd).
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, **kw: sdpa_flop_count(q, k, v),
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad_out, q, k, v, *args, **kw: sdpa_backward_flop_count(grad_out, q, k, v)}


# ----------------------------------------------------------------------------------------------------------------------
# 1. tokens per example (Table 3)

def prompt_lengths(d, tok, text_events, targets):
    """LLM input tokens of each example's next-item prompt: the last text_events events as text (0: none), the query."""
    prompter = Prompter(d, tok, "next_item", text_events, max_text_tokens=0, max_answer_tokens=1)  # prompts() only
    return np.array([len(p) for p in prompter.prompts(targets)])


def token_table(d, tokenizers, ns, examples, seed):
    """One row per (tokenizer, N): TP-N's mean/max prompt tokens, the mean events actually rendered (users with fewer
    than N earlier events render all they have), and User-LLM's fixed query, which doesn't depend on N."""
    targets = seeded_subset(d.targets("test"), examples, seed)
    before = targets - d.offsets[d.user_of(targets)]  # events before each target
    rows = []
    for name, tok in tokenizers.items():
        query = prompt_lengths(d, tok, 0, targets)
        for n in ns:
            tp = prompt_lengths(d, tok, n, targets)
            rows.append(dict(tokenizer=name, N=n, examples=len(targets), events=float(np.minimum(before, n).mean()),
                             textprompt_mean=float(tp.mean()), textprompt_max=int(tp.max()),
                             userllm=float(query.mean()), userllm_max=int(query.max()),
                             paper_textprompt=PAPER_TOKENS.get(n), paper_userllm=PAPER_TOKENS[0]))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 2. the 6ND rule (Sec 4.4)

def six_nd(params, tokens):
    """Training FLOPs by the 6·N·D rule: 2 per parameter per token forward, 4 backward."""
    return 6 * params * tokens


def six_nd_reduction(text_tokens, userllm_tokens):
    """FLOPs saved by User-LLM on the same LLM: 6·N·D_text / 6·N·D_userllm, i.e. the ratio of input tokens."""
    return six_nd(1, text_tokens) / six_nd(1, userllm_tokens)


def six_nd_table(token_rows):
    """The paper's reductions (32 vs 700/1350/2500 tokens) beside ours (our measured TP-N mean vs our query)."""
    rows = []
    for r in token_rows:
        paper = six_nd_reduction(r["paper_textprompt"], r["paper_userllm"]) if r["paper_textprompt"] else None
        rows.append(dict(tokenizer=r["tokenizer"], N=r["N"], paper=f"{r['paper_textprompt']} / {r['paper_userllm']}",
                         paper_reduction=paper, ours=f"{r['textprompt_mean']:.0f} / {r['userllm']:.0f}",
                         ours_reduction=six_nd_reduction(r["textprompt_mean"], r["userllm"])))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 3. measured cost of training and generation

VARIANTS = (  # name, fusion, Perceiver, text events (None: seq_len, TextPrompt's N = the encoder's N)
    ("TextPrompt TP{n}", "none", False, None),
    ("User-LLM xattn", "xattn", False, 0),
    ("User-LLM xattn + Perceiver", "xattn", True, 0),
    ("User-LLM soft prompt", "soft_prompt", False, 0),
    ("User-LLM soft prompt + Perceiver", "soft_prompt", True, 0),
)


def llm_config(cfg):
    """The train_llm.py config all variants share. A GPT-2 shape with random weights is built as a 'scratch' GPT of that
    shape (GPT-2's tokenizer and 1024 positions), so build_model needs no download."""
    c = types.SimpleNamespace(**{**userllm.DEFAULTS, **{k: getattr(cfg, k) for k in SHAPE_KEYS}})
    c.llm, c.task, c.encoder_ckpt = cfg.llm, "next_item", ""  # a random encoder: its shape is what costs
    if cfg.llm != "scratch" and cfg.random_weights:
        if cfg.llm not in GPT2_SHAPES:
            raise SystemExit(f"config: random_weights needs llm in {', '.join(GPT2_NAMES)} (or 'scratch'), "
                             f"got '{cfg.llm}'")
        c.llm, (c.n_layer, c.n_head, c.n_embd) = "scratch", GPT2_SHAPES[cfg.llm]
        c.max_text_tokens = 1024 - c.n_task_tokens - c.seq_len  # build_model adds the soft prompt's positions back
    return c


def user_positions(model, hist):
    """(P soft-prompt positions in front of the text, M user embeddings the LLM attends to) for a batch's history."""
    if model.fusion == "none":
        return 0, 0
    with torch.no_grad():
        ctx = model.context(hist)
    if "prefix" in ctx:
        P = ctx["prefix"].size(1)  # (B, n_task + M, C)
        return P, P - model.soft_prompt.task.size(0)
    return 0, ctx["user"].size(1)  # (B, M, D)


def count_flops(model, batch):
    """Forward + backward FLOPs of one training batch: (total, user side = encoder + Perceiver + soft-prompt MLP).
    The user side is counted in a second pass over model.context alone (backward from its outputs), since the module
    attribution of backward ops is unreliable; the LLM part (with its cross-attention blocks) is the difference."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as total:
        model(batch).backward()
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as side:
        outs = [v for v in model.context(batch["hist"]).values() if v.requires_grad]
        if outs:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    model.zero_grad(set_to_none=True)
    return total.get_total_flops(), side.get_total_flops()


def time_train_step(model, batch, steps):
    """Median wall-clock ms of a training step (forward, backward, AdamW), after one warmup step; batch prebuilt."""
    opt, times = adamw(model, 1e-5, 0.0), []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        model(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])


@torch.no_grad()
def time_answer(model, d, prompter, targets, seq_len, max_new):
    """Median ms to generate one answer (batch 1, greedy, exactly max_new tokens with the KV cache), user context
    (encoder, Perceiver) included; the first example warms up."""
    model.eval()
    times = []
    for t in targets:
        idx = torch.tensor(prompter.prompts([t]))  # (1, T)
        t0 = time.perf_counter()
        generate(model.llm, idx, max_new, **model.context(to_device(d.batch([t], seq_len), "cpu")["hist"]))
        times.append(time.perf_counter() - t0)
    model.train()
    return 1000 * statistics.median(times[1:])


def measure(cfg, d, tok, name, fusion, perceiver, text_events, train_ids, gen_ids):
    """One row of table 3: build the variant, count one batch's FLOPs, time training steps and answers."""
    c = llm_config(cfg)
    c.fusion, c.perceiver, c.text_events = fusion, perceiver, text_events
    c.strategy = "full" if fusion == "none" and cfg.strategy in ("enc", "proj") else cfg.strategy
    prompter = Prompter(d, tok, "next_item", text_events, 10 ** 9, c.max_answer_tokens)  # length checked below
    batch = to_device(prompter(d.batch(train_ids, c.seq_len), train_ids), "cpu")
    max_new = max(len(a) for a in prompter.answers) - 1  # the longest title (without eot)
    longest = max(batch["idx"].size(1), max(len(p) for p in prompter.prompts(gen_ids)) + max_new)
    c.max_text_tokens = max(c.max_text_tokens, longest)  # TextPrompt's long prompts get positions (no FLOPs)
    torch.manual_seed(cfg.seed)
    model = build_model(c, d, tok)
    B, T = batch["idx"].shape
    P, M = user_positions(model, batch["hist"])
    total, user = count_flops(model, batch)
    return dict(variant=name, T=T, P=P, M=M, llm_gflops=(total - user) / B / 1e9, user_gflops=user / B / 1e9,
                gflops=total / B / 1e9, ms_step=time_train_step(model, batch, cfg.steps),
                ms_answer=time_answer(model, d, prompter, gen_ids, c.seq_len, max_new), answer_tokens=max_new,
                params=sum(p.numel() for p in model.parameters()))


def cost_table(cfg, d, tok):
    """Table 3 of ours: per training example FLOPs (LLM / user side), ms per step and per answer, for every variant."""
    train_ids = batch_targets(d.targets("train"), 0, cfg.batch_size, cfg.seed)
    gen_ids = seeded_subset(d.targets("test"), cfg.gen_examples + 1, cfg.seed)[:cfg.gen_examples + 1]
    rows = [measure(cfg, d, tok, name.format(n=cfg.seq_len), fusion, perceiver,
                    cfg.seq_len if events is None else events, train_ids, gen_ids)
            for name, fusion, perceiver, events in VARIANTS]
    for r in rows:
        r["vs_textprompt"] = rows[0]["gflops"] / r["gflops"]  # FLOPs saved per training example
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 4. encoder pretraining throughput (train_encoder.py)

# dense bf16 FLOP/s per GPU (SXM unless named); other devices: no MFU shown
PEAK_FLOPS = {"H100": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}


def encoder_table(config_path, d, batch_size, steps, device):
    """Examples/s, events/s, supervised targets/s and achieved FLOP/s of one training step (forward, backward, AdamW)
    of a train_encoder.py config's encoder on dataset d; MFU against the device's peak where it is known."""
    c = configure(encoder.DEFAULTS, [config_path])
    model = make_encoder(encoder_config(c, d.vocab_sizes)).to(device)
    ids = seeded_subset(d.targets("train"), batch_size, 0)
    batch = to_device(d.batch(ids, c.seq_len), device)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model(batch).backward()
    model.zero_grad(set_to_none=True)
    ms = time_train_step(model, batch, steps)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_flops(name)
    achieved, per_s = counter.get_total_flops() / (ms / 1000), 1000 / ms
    return [dict(config=os.path.basename(config_path), params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                 batch=len(ids), N=c.seq_len, ms_step=ms, examples_per_s=len(ids) * per_s,
                 events_per_s=len(ids) * c.seq_len * per_s, targets_per_s=supervised_targets(model, batch) * per_s,
                 gflops_per_s=achieved / 1e9, device=name, mfu=f"{100 * achieved / peak:.1f}%" if peak else "n/a")]


def supervised_targets(model, batch):
    """Events a training step's loss predicts (each on every feature): the AR encoder's next event after every real
    history event (the last one's is the target), the Dual Encoder's one label per example, Bert4Rec's masked events
    (random: about mask_prob of the real events, the target included, at least one per sequence)."""
    real = (batch["hist"][0] != 0).sum(1)  # (B,) real history events per example
    if model.cfg.kind == "ar":
        return real.sum().item()
    if model.cfg.kind == "dual":
        return len(real)
    return (model.cfg.mask_prob * (real + 1)).clamp(min=1).sum().item()


# ----------------------------------------------------------------------------------------------------------------------
# 5. fp32 vs bf16 autocast on the CPU: what dtype=auto should pick there

SYNTHETIC_VOCABS = (501, 17, 11)  # data/synthetic's item, genre and rating ids: 500, 16, 10, each + padding id 0
DEMO_T = 51  # the demo LLM's padded batch length: its 21-byte query + the longest title in a batch of 64


def encoder_case(name, cfg, B):
    """One train_encoder.py loss on B random full histories of cfg.block_size - 1 events; cfg an EncoderConfig."""
    model, N = make_encoder(cfg), cfg.block_size - 1
    batch = dict(hist=tuple(torch.randint(1, v, (B, N)) for v in cfg.vocab_sizes),
                 target=tuple(torch.randint(1, v, (B,)) for v in cfg.vocab_sizes))
    return dict(name=name, model=model, loss=lambda: model(batch), units=B * N, unit="events")


def gpt_case(name, cfg, B, T, M=50):
    """One GPT loss on B x T random token ids (targets: the ids); with cross-attention (cfg.d_user > 0) over M random
    user embeddings, as User-LLM's GPT sees the encoder's output."""
    model, idx = GPT(cfg), torch.randint(0, cfg.vocab_size, (B, T))
    user = torch.randn(B, M, cfg.d_user) if cfg.d_user else None
    return dict(name=name, model=model, loss=lambda: model(idx, idx, user=user)[1], units=B * T, unit="tokens")


def dtype_cases(gpt2_batch, gpt2_len):
    """The three shapes compared, random weights and ids (no dataset): the demo encoder (configs/synthetic_enc.py,
    its batch), the demo User-LLM's GPT with its cross-attention (configs/synthetic_llm.py, its batch) and GPT-2 small
    (1024 positions, a shorter sequence to keep the CPU run short)."""
    e = configure(encoder.DEFAULTS, [os.path.join(HERE, "configs", "synthetic_enc.py")])
    enc = EncoderConfig(vocab_sizes=SYNTHETIC_VOCABS, feature_dims=e.feature_dims, n_embd=e.n_embd, n_layer=e.n_layer,
                        n_head=e.n_head, block_size=history_positions(e.seq_len))
    demo = GPTConfig(block_size=DEMO["max_text_tokens"] + DEMO["n_task_tokens"] + DEMO["seq_len"], vocab_size=257,
                     n_layer=DEMO["n_layer"], n_head=DEMO["n_head"], n_embd=DEMO["n_embd"], d_user=DEMO["enc_n_embd"])
    return [encoder_case("demo encoder", enc, e.batch_size),
            gpt_case("demo User-LLM GPT", demo, DEMO["batch_size"], DEMO_T, DEMO["seq_len"]),
            gpt_case("GPT-2 small", GPTConfig(), gpt2_batch, gpt2_len)]


def fwd_bwd_ms(model, loss_fn, dtype):
    """Wall-clock ms of one forward + backward under CPU autocast to dtype (float32: none). No optimizer step: AdamW
    runs on the fp32 weights whatever the autocast dtype."""
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return 1000 * (time.perf_counter() - t0)


def bench_dtype(cases, steps):
    """Table 5: per case, the median fp32 and bf16-autocast ms of a forward + backward, units/s in each, speedup =
    fp32 / bf16. One warmup step each, then the two dtypes alternate step by step, so a burst of load from other
    processes on a shared machine hits both alike."""
    rows = []
    for c in cases:
        times = {dt: [] for dt in (torch.float32, torch.bfloat16)}
        for i in range(steps + 1):
            for dt, ts in times.items():
                ms = fwd_bwd_ms(c["model"], c["loss"], dt)
                if i:  # step 0 warms up
                    ts.append(ms)
        fp32, bf16 = (statistics.median(ts) for ts in times.values())
        rows.append(dict(model=c["name"], params_m=sum(p.numel() for p in c["model"].parameters()) / 1e6,
                         units=f"{c['units']:,} {c['unit']}", fp32_ms=fp32, bf16_ms=bf16, speedup=fp32 / bf16,
                         fp32_per_s=1000 * c["units"] / fp32, bf16_per_s=1000 * c["units"] / bf16))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 6. GPU check: the training scripts themselves, bf16 + torch.compile and fp16 + GradScaler, throughput and MFU

def gpu_check_runs(cfg):
    """The runs, each the real script under torchrun (one process) from random init: configs/synthetic_enc.py's
    encoder; configs/synthetic_llm.py's User-LLM with a GPT of gpu_check_shape (GPT-2 small: no weights offline) and
    a random encoder (encoder_ckpt ''), in gpu_check_dtype, then in float16 without compile (the GradScaler path).
    Units/s are logged every third of a run and evaluation runs only at its start and end, so the windows after the
    first time training steps alone."""
    n_layer, n_head, n_embd = cfg.gpu_check_shape
    llm = ["--llm=scratch", f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}", "--encoder_ckpt=",
           "--llm_ckpt=", "--lr=6e-4", "--min_lr=6e-5"]  # GPT-2's learning rate, from random weights
    enc_batch, llm_batch = cfg.gpu_check_batch
    data = [f"--data_dir={os.path.abspath(cfg.data_dir)}"] if cfg.data_dir else []  # '': data/synthetic
    runs = [("encoder", "train_encoder.py", "configs/synthetic_enc.py", [], enc_batch, cfg.gpu_check_dtype,
             cfg.gpu_check_compile, cfg.gpu_check_steps),
            ("llm", "train_llm.py", "configs/synthetic_llm.py", llm, llm_batch, cfg.gpu_check_dtype,
             cfg.gpu_check_compile, cfg.gpu_check_steps),
            ("llm-fp16", "train_llm.py", "configs/synthetic_llm.py", llm, llm_batch, "float16", False,
             cfg.gpu_check_fp16_steps)]
    out = []
    for name, script, config, extra, batch, dtype, compiled, steps in runs:
        out_dir = os.path.join(os.path.abspath(cfg.gpu_check_dir), name)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", script, config,
               *data, *extra, f"--batch_size={batch}", f"--max_steps={steps}", f"--dtype={dtype}",
               f"--compile={compiled}", f"--log_interval={max(1, steps // 3)}", f"--eval_interval={steps}",
               "--eval_examples=256", f"--out_dir={out_dir}"]
        out.append(dict(run=name, llm=script == "train_llm.py", cmd=cmd, dtype=dtype, compile=compiled, steps=steps,
                        out_dir=out_dir))
    return out


def run_logged(cmd, log_path, timeout):
    """Run cmd in this folder, its output in log_path. Returns its exit code, or None when it ran past timeout: then
    its whole process group (torchrun and its worker) is killed, so no orphan keeps the GPU."""
    if timeout <= 0:
        return None
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return None


def log_tail(path, lines=15):
    """The last lines of a run's own output, tqdm's carriage returns as line breaks; torchrun's report of a failure
    (from its first line naming torch/distributed/elastic on) is cut, as it only repeats the exit code."""
    with open(path, errors="replace") as f:
        text = f.read().replace("\r", "\n").splitlines()
    cut = next((i for i, line in enumerate(text) if "torch/distributed/elastic" in line), len(text))
    return "\n".join(text[:cut][-lines:])


def logged_rate(log_path):
    """Units/s over the logged windows after the first (which holds torch.compile's compilation and the first
    evaluation), or of the only one: their units over their seconds, from each window's rate and length in steps.
    None when nothing was logged."""
    with open(log_path) as f:
        rows = [r for r in map(json.loads, f) if "units_per_s" in r]
    if not rows:
        return None
    steps = np.diff([0] + [r["step"] for r in rows])
    rates = np.array([r["units_per_s"] for r in rows])
    k = 1 if len(rows) > 1 else 0
    return float(steps[k:].sum() / (steps[k:] / rates[k:]).sum())


def run_shape(out_dir, llm):
    """(parameters, LLM input tokens per example or None for the encoder) of a run, from its config.json: the model
    rebuilt on the CPU and, for the LLM, the mean real (unpadded) prompt + answer positions over 1,000 seeded
    training examples (train.py logs examples/s, the batch's padded length varies)."""
    with open(os.path.join(out_dir, "config.json")) as f:
        c = types.SimpleNamespace(**json.load(f))
    d = UserData(c.data_dir or os.path.join(HERE, "data", c.dataset))
    if not llm:
        return sum(p.numel() for p in make_encoder(encoder_config(c, d.vocab_sizes)).parameters()), None
    tok = get_tokenizer(c.llm)
    params = sum(p.numel() for p in build_model(c, d, tok).parameters())
    ids = seeded_subset(d.targets("train", c.min_history), 1000, c.seed)
    prompter = Prompter(d, tok, c.task, c.text_events, c.max_text_tokens, c.max_answer_tokens)
    answers = prompter.answer_tokens(ids, d.batch(ids, c.seq_len))
    return params, float(np.mean([len(p) + len(a) - 1 for p, a in zip(prompter.prompts(ids), answers)]))


def peak_flops(device_name):
    """Dense bf16 (= fp16) peak FLOP/s of a device by its name (the longest key it contains); None when unknown."""
    keys = [k for k in PEAK_FLOPS if k in device_name]
    return PEAK_FLOPS[max(keys, key=len)] if keys else None


def mfu(params, tokens_per_s, peak):
    """Model FLOPs utilisation: the 6·N·D training FLOPs per second over the device's peak (None: peak unknown). N is
    every parameter, D the real tokens (encoder: events), so attention scores, padding and, for User-LLM, the
    encoder's per-event work are left out: it understates what the device computes."""
    return six_nd(params, tokens_per_s) / peak if peak and tokens_per_s else None


def check_row(r, code, wall, peak):
    """One table row of a finished run; status 'ok' or why it failed."""
    row = dict(run=r["run"], dtype=r["dtype"], compile=str(r["compile"]), steps=r["steps"], wall_s=wall,
               unit="examples" if r["llm"] else "events", units_per_s=None, tokens_per_s=None, params_m=None, mfu="-")
    log = os.path.join(r["out_dir"], "log.jsonl")
    rate = logged_rate(log) if code == 0 and os.path.isfile(log) else None
    row["status"] = "timed out" if code is None else f"exit {code}" if code else "ok" if rate else "no units_per_s"
    if row["status"] == "ok":
        params, tokens = run_shape(r["out_dir"], r["llm"])
        row.update(units_per_s=rate, tokens_per_s=rate * (tokens or 1), params_m=params / 1e6)
        m = mfu(params, row["tokens_per_s"], peak)
        row["mfu"] = f"{100 * m:.1f}%" if m is not None else "n/a"
    return row


def gpu_check(cfg):
    """Prepare data/synthetic if missing (and no data_dir given), run gpu_check_runs one after another within
    gpu_check_timeout seconds in all, print the table (and write it to gpu_check_dir/summary.json). Exits 1, naming
    the failed runs and showing their output's tail, when any fails."""
    deadline, check_dir = time.time() + cfg.gpu_check_timeout, os.path.abspath(cfg.gpu_check_dir)
    os.makedirs(check_dir, exist_ok=True)
    if not cfg.data_dir and not os.path.isfile(os.path.join(HERE, "data", "synthetic", "meta.json")):
        print("preparing data/synthetic: python data.py", flush=True)
        if run_logged([sys.executable, "data.py"], os.path.join(check_dir, "data.log"), deadline - time.time()) != 0:
            raise SystemExit(f"gpu check FAILED: python data.py\n{log_tail(os.path.join(check_dir, 'data.log'))}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    for r in gpu_check_runs(cfg):
        print("torchrun " + " ".join(r["cmd"][3:]), flush=True)  # python -m torch.distributed.run: this venv's torchrun
        shutil.rmtree(r["out_dir"], ignore_errors=True)  # train() appends to log.jsonl: start from an empty one
        os.makedirs(r["out_dir"])
        t0 = time.time()
        code = run_logged(r["cmd"], os.path.join(r["out_dir"], "run.log"), deadline - time.time())
        rows.append(check_row(r, code, time.time() - t0, peak_flops(device)))
        if rows[-1]["status"] != "ok":
            print(f"{r['run']}: {rows[-1]['status']}; the end of {r['out_dir']}/run.log:\n"
                  f"{log_tail(os.path.join(r['out_dir'], 'run.log'))}", flush=True)
    print_table(f"6. GPU check on {device}: training throughput (units/s after the first logged window) and MFU "
                f"(6·params·tokens/s over the dense bf16 peak)", rows,
                [("run", "run", ""), ("dtype", "dtype", ""), ("compile", "compile", ""), ("steps", "steps", "d"),
                 ("wall s", "wall_s", ".0f"), ("units/s", "units_per_s", ",.0f"), ("unit", "unit", ""),
                 ("tokens/s", "tokens_per_s", ",.0f"), ("params (M)", "params_m", ".1f"), ("MFU", "mfu", ""),
                 ("status", "status", "")])
    with open(os.path.join(check_dir, "summary.json"), "w") as f:
        json.dump(dict(device=device, rows=rows, commands=[r["cmd"] for r in gpu_check_runs(cfg)]), f, indent=2)
    if failed := [f"{r['run']} ({r['status']})" for r in rows if r["status"] != "ok"]:
        raise SystemExit(f"gpu check FAILED: {', '.join(failed)}")
    print("gpu check passed")
    return rows


def print_table(title, rows, columns):
    """columns: (header, key, format). A None value prints as '-'."""
    cells = [[h for h, _, _ in columns]] + [["-" if r[k] is None else format(r[k], f) for _, k, f in columns]
                                            for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for row in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


def tokenizers():
    """The two tokenizers of table 1; the GPT-2 one is skipped with a printed note when it can't be loaded (offline)."""
    out = {}
    try:
        out["gpt2 (r50k_base)"] = get_tokenizer("gpt2")
    except SystemExit as e:
        print(f"note: table 1 without the GPT-2 tokenizer: {e}")
    out["bytes (scratch)"] = get_tokenizer("scratch")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 7. data preparation at scale: data.py on an ml-20m-sized ratings.csv, then batch assembly

def write_bench_files(raw_dir, n_events, seed):
    """A MovieLens-format ratings.csv/movies.csv shaped like ml-20m (138k users, 27k movies, Zipf popularity, file
    ordered by user then movie), generated vectorised: the input of the scale benchmark."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(1, n_events // 145), 27_000
    w = rng.exponential(1.0, n_users)
    lengths = 20 + np.floor(w / w.sum() * (n_events - 20 * n_users)).astype(np.int64)
    lengths[: n_events - lengths.sum()] += 1
    user = np.repeat(np.arange(1, n_users + 1), lengths)
    cdf = np.cumsum(np.arange(1, n_items + 1) ** -1.0)
    item = np.searchsorted(cdf, rng.random(n_events) * cdf[-1]) + 1
    order = np.lexsort((item, user))
    rating = rng.integers(1, 11, n_events) / 2
    ts = rng.integers(789652009, 1427784002, n_events)
    os.makedirs(raw_dir, exist_ok=True)
    write_ratings_csv(os.path.join(raw_dir, "ratings.csv"), user, item[order], rating, ts)
    with open(os.path.join(raw_dir, "movies.csv"), "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(("movieId", "title", "genres"))
        wr.writerows((i, f"Movie {i}, The ({1900 + i % 115})", "|".join(rng.choice(GENRES, 2, replace=False)))
                     for i in range(1, n_items + 1))


def bench_prepare(cfg, seconds=3):
    """Prepare time and peak memory on a bench_events ratings.csv (data.py in a fresh process, so generating the
    file doesn't count), then batch assembly examples/s at N=50 and 200, B=1024, each timed for `seconds`."""
    import resource
    raw, out = os.path.join(cfg.bench_dir, "raw"), os.path.join(cfg.bench_dir, "prepared")
    if not os.path.exists(os.path.join(raw, "ratings.csv")):
        t0 = time.time()
        write_bench_files(raw, cfg.bench_events, cfg.seed)
        print(f"wrote {os.path.join(raw, 'ratings.csv')} ({cfg.bench_events:,} events) in {time.time() - t0:.0f}s")
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "--dataset=ml20m", f"--raw_dir={raw}",
                    f"--out_dir={out}"], check=True)
    secs, peak = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # KiB -> GiB
    d = UserData(out)
    train = d.targets("train")
    print(f"prepare: {d.meta['n_events']:,} events, {d.n_users:,} users in {secs:.1f}s, peak RSS {peak:.2f} GiB; "
          f"{len(train):,} training examples")
    rows = []
    for N in (50, 200):
        batch_targets(train, 0, 1024, 0)  # the epoch permutation is computed once per epoch, not per step
        step, t0 = 0, time.time()
        while time.time() - t0 < seconds:
            d.batch(batch_targets(train, step, 1024, 0), N)
            step += 1
        rows.append(dict(N=N, examples_per_s=step * 1024 / (time.time() - t0)))
        print(f"batch N={N}, B=1024: {rows[-1]['examples_per_s']:,.0f} examples/s (one core)")
    return dict(n_events=d.meta["n_events"], n_users=d.n_users, prepare_s=secs, peak_rss_gib=peak, batch=rows)


def main(argv):
    cfg = configure(DEFAULTS, argv, __doc__)
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    if cfg.gpu_check:
        return gpu_check(cfg)
    if cfg.bench_prepare:  # only 7, its own data
        return bench_prepare(cfg)
    if cfg.bench_dtype:  # only table 5, no dataset needed
        torch.manual_seed(cfg.seed)
        rows = bench_dtype(dtype_cases(cfg.bench_gpt2_batch, cfg.bench_gpt2_len), cfg.steps)
        caps = torch.cpu.get_capabilities()
        print_table(f"5. forward + backward per step, fp32 vs bf16 autocast, CPU {caps.get('cpu_name', '?')} "
                    f"(avx512_bf16 {caps.get('avx512_bf16')}, amx_bf16 {caps.get('amx_bf16')}), torch threads "
                    f"{torch.get_num_threads()}, median of {cfg.steps} steps", rows,
                    [("model", "model", ""), ("params (M)", "params_m", ".2f"), ("per step", "units", ""),
                     ("fp32 ms/step", "fp32_ms", ".1f"), ("bf16 ms/step", "bf16_ms", ".1f"),
                     ("speedup", "speedup", ".2f"), ("fp32 units/s", "fp32_per_s", ",.0f"),
                     ("bf16 units/s", "bf16_per_s", ",.0f")])
        return rows
    d = UserData(cfg.data_dir or os.path.join("data", cfg.dataset))
    if cfg.encoder:  # only the encoder benchmark
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows = encoder_table(cfg.encoder, d, cfg.batch_size, cfg.steps, device)
        print_table(f"4. encoder training step (forward, backward, AdamW), data {d.path}", rows,
                    [("config", "config", ""), ("params (M)", "params_m", ".2f"), ("batch", "batch", "d"),
                     ("N", "N", "d"), ("ms/step", "ms_step", ".0f"), ("examples/s", "examples_per_s", ",.0f"),
                     ("events/s", "events_per_s", ",.0f"), ("targets/s", "targets_per_s", ",.0f"),
                     ("GFLOP/s", "gflops_per_s", ".1f"), ("device", "device", ""), ("MFU", "mfu", "")])
        return rows
    shape = llm_config(cfg)  # checks llm / random_weights
    tok = get_tokenizer(cfg.llm)  # fails early, with its one-line message, before any table
    print(f"query: {QUERY['next_item']!r}; data {d.path}; torch threads {torch.get_num_threads()}")
    tokens = token_table(d, tokenizers(), (50, 100, 200), cfg.examples, cfg.seed)
    print_table(f"1. LLM input tokens per example (paper Table 3), {tokens[0]['examples']} seeded test examples",
                tokens, [("tokenizer", "tokenizer", ""), ("N", "N", "d"), ("events", "events", ".1f"),
                         ("TP-N mean", "textprompt_mean", ".1f"), ("TP-N max", "textprompt_max", "d"),
                         ("User-LLM", "userllm", ".0f"), ("paper TP-N", "paper_textprompt", "d"),
                         ("paper User-LLM", "paper_userllm", "d")])
    nd = six_nd_table(tokens)
    print_table("2. FLOPs reduction by the 6ND rule = TextPrompt tokens / User-LLM tokens (Sec 4.4)", nd,
                [("tokenizer", "tokenizer", ""), ("N", "N", "d"), ("paper tokens", "paper", ""),
                 ("paper", "paper_reduction", ".1f"), ("our tokens", "ours", ""), ("ours", "ours_reduction", ".1f")])
    cost = cost_table(cfg, d, tok)
    print_table(f"3. measured cost per training example, batch {cfg.batch_size}, N={cfg.seq_len}, GPT n_layer="
                f"{shape.n_layer} n_embd={shape.n_embd} ({shape.llm if cfg.llm == 'scratch' else cfg.llm}"
                f"{', random weights' if cfg.random_weights else ''}), strategy {cfg.strategy}", cost,
                [("variant", "variant", ""), ("T", "T", "d"), ("P", "P", "d"), ("M", "M", "d"),
                 ("LLM GFLOPs", "llm_gflops", ".3f"), ("user GFLOPs", "user_gflops", ".4f"),
                 ("total GFLOPs", "gflops", ".3f"), ("saving", "vs_textprompt", ".1f"), ("ms/step", "ms_step", ".0f"),
                 ("ms/answer", "ms_answer", ".1f")])
    print(f"T: text tokens (the batch's padded length); P: soft-prompt positions (n_task={cfg.n_task_tokens} + M); "
          f"M: user embeddings the LLM sees. FLOPs: forward + backward per example; user = encoder + Perceiver + "
          f"soft-prompt MLP. ms/answer: batch 1, greedy, {cost[0]['answer_tokens']} tokens (the longest title).")
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump(dict(config=vars(cfg), tokens=tokens, six_nd=nd, cost=cost), f, indent=2)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main(sys.argv[1:])

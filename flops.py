"""
The paper's efficiency claims, measured (paper Table 3, Sec 3.2.2 and 4.4): User-LLM hands the LLM a
short fixed query and puts the user's history in embeddings, where TextPrompt writes the history out
as text.

    python data.py && python flops.py       # the synthetic default and the demo's GPT, a minute
    python flops.py --llm=gpt2 --random_weights=True --batch_size=2 --steps=2    # at GPT-2's shape
    python data.py --dataset=ml20m-shape && python flops.py --scale=True   # ML-20M configs: cost

Four tables, printed and written as JSON to --out (default out/flops.json):
1. tokens (Table 3): LLM input tokens per example, TextPrompt TP-N (the last N events as text, then
   the query) for N = 50/100/200 against User-LLM (the query only), on a seeded sample of test
   examples, with GPT-2's tokenizer (tiktoken r50k_base; skipped with a note when it cannot be
   loaded) and the byte-level one.
2. the 6ND rule (Sec 4.4): training FLOPs ~ 6 x parameters x tokens, so on the same LLM the saving
   is the token ratio: the paper's 32 against 700/1350/2500 tokens gives 21.9x/42.2x/78.1x, beside
   ours.
3. the measured cost of a training step (forward, backward, AdamW) and of a generated answer, on one
   real training batch, for TextPrompt TP50 and User-LLM (cross-attention or soft prompt, each with
   and without the Perceiver 50 -> 16), on the same GPT, the user encoder and Perceiver that 6ND
   leaves out included.
4. the parameters each strategy trains (Table 5: Full, LoRA, Enc, Proj), at the demo's shape and at
   GPT-2 small with MovieLens-20M's encoder, cross-attention before every block or every 4th,
   at the LLM's widths or narrow.
With --scale=True, instead, table 5: each ML-20M config at its own shape (parameters, FLOPs,
memory per GPU, hours on 8 GPUs).

FLOPs are counted by torch.utils.flop_counter (matmuls and attention; not elementwise ops, softmax
or LayerNorm; attention over the full T x T square, as for the causal kernels on GPU).
--random_weights=True builds a GPT-2-shaped model with random weights (FLOPs and time do not depend
on weight values). Benchmarks of throughput, precision and scale are bench.py's.

Dimension letters: B batch, T text tokens (the batch's padded length), P soft-prompt positions
(n_task + M), M user embeddings the LLM sees (N events, or the Perceiver's latents), N history
events.
"""
import json
import os
import statistics
import time
import types

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import encoder
import userllm
from common import cpu_sdpa_flops, print_table, seeded_subset, six_nd, time_train_step, to_device
from config import UserError, cli, configure, run_config_file
from data import QUERY, Prompter, UserData, batch_targets, get_tokenizer
from decode import generate
from gpt2 import GPT2_NAMES, GPT2_SHAPES
from userllm import build_model

HERE = os.path.dirname(os.path.abspath(__file__))
# train_llm.py keys that set a model's shape; their defaults are the demo's (synthetic_llm.py)
SHAPE_KEYS = ("seq_len", "n_layer", "n_head", "n_embd", "max_text_tokens", "n_latents",
              "perceiver_layers", "n_task_tokens", "enc_feature_dims", "enc_n_embd", "enc_n_layer",
              "enc_n_head", "xattn_every", "xattn_dim", "xattn_ffw", "max_answer_tokens")
DEMO = vars(configure(userllm.DEFAULTS, [os.path.join(HERE, "configs", "synthetic_llm.py")]))
DEFAULTS = dict(
    dataset="synthetic", data_dir="", examples=200,  # table 1: test examples tokenized
    out="out/flops.json", llm="scratch", random_weights=False,  # random weights: no download
    strategy="full",  # what trains in table 3 (6ND assumes all LLM weights train); TextPrompt: full
    batch_size=8, steps=3, gen_examples=3,  # table 3: one batch, timed steps (+1 warmup), answers
    threads=0, seed=1337,  # threads 0: every core this process may use
    scale=False,  # True: only table 5, the ML-20M configs' cost (on data/ml20m-shape by default)
    **{k: DEMO[k] for k in SHAPE_KEYS},
)
PAPER_TOKENS = {0: 32, 50: 700, 100: 1350, 200: 2500}  # Table 3: User-LLM (0 events), TP50/100/200


# --------------------------------------------------------------------------------------------------
# 1. tokens per example (Table 3)

def prompt_lengths(d, tok, text_events, targets):
    """LLM input tokens of each example's next-item prompt: the last text_events events as text (0:
    none), the query."""
    prompter = Prompter(d, tok, "next_item", text_events, max_text_tokens=0, max_answer_tokens=1)
    return np.array([len(p) for p in prompter.prompts(targets)])


def token_table(d, tokenizers, ns, examples, seed):
    """One row per (tokenizer, N): TP-N's mean/max prompt tokens, the mean events actually rendered
    (users with fewer than N earlier events render all they have), and User-LLM's fixed query, which
    doesn't depend on N."""
    targets = seeded_subset(d.targets("test"), examples, seed)
    before = targets - d.offsets[d.user_of(targets)]  # events before each target
    rows = []
    for name, tok in tokenizers.items():
        query = prompt_lengths(d, tok, 0, targets)
        for n in ns:
            tp = prompt_lengths(d, tok, n, targets)
            rows.append(dict(tokenizer=name, N=n, examples=len(targets),
                             events=float(np.minimum(before, n).mean()),
                             textprompt_mean=float(tp.mean()), textprompt_max=int(tp.max()),
                             userllm=float(query.mean()), userllm_max=int(query.max()),
                             paper_textprompt=PAPER_TOKENS.get(n), paper_userllm=PAPER_TOKENS[0]))
    return rows




# --------------------------------------------------------------------------------------------------
# 2. the 6ND rule (Sec 4.4)

def six_nd_reduction(text_tokens, userllm_tokens):
    """FLOPs saved by User-LLM on the same LLM: 6·N·D_text / 6·N·D_userllm, i.e. the ratio of input
    tokens."""
    return six_nd(1, text_tokens) / six_nd(1, userllm_tokens)


def six_nd_table(token_rows):
    """The paper's reductions (32 vs 700/1350/2500 tokens) beside ours (our measured TP-N mean vs
    our query)."""
    rows = []
    for r in token_rows:
        paper = None
        if r["paper_textprompt"]:
            paper = six_nd_reduction(r["paper_textprompt"], r["paper_userllm"])
        rows.append(dict(tokenizer=r["tokenizer"], N=r["N"],
                         paper=f"{r['paper_textprompt']} / {r['paper_userllm']}",
                         paper_reduction=paper,
                         ours=f"{r['textprompt_mean']:.0f} / {r['userllm']:.0f}",
                         ours_reduction=six_nd_reduction(r["textprompt_mean"], r["userllm"])))
    return rows


# --------------------------------------------------------------------------------------------------
# 3. measured cost of training and generation

VARIANTS = (  # name, fusion, Perceiver, text events (None: seq_len, the encoder's N)
    ("TextPrompt TP{n}", "none", False, None),
    ("User-LLM xattn", "xattn", False, 0),
    ("User-LLM xattn + Perceiver", "xattn", True, 0),
    ("User-LLM soft prompt", "soft_prompt", False, 0),
    ("User-LLM soft prompt + Perceiver", "soft_prompt", True, 0),
)


def variant_config(cfg):
    """The train_llm.py config all variants share; with random_weights, GPT-2's shape (its
    tokenizer, 1024 positions) with random weights: nothing to download."""
    c = types.SimpleNamespace(**{**userllm.DEFAULTS, **{k: getattr(cfg, k) for k in SHAPE_KEYS}})
    c.llm, c.task, c.encoder_ckpt = cfg.llm, "next_item", ""  # a random encoder: its shape costs
    c.random_weights = cfg.random_weights and cfg.llm != "scratch"
    if c.random_weights:
        if cfg.llm not in GPT2_SHAPES:
            raise UserError(f"config: random_weights needs llm in {', '.join(GPT2_NAMES)} (or "
                            f"'scratch'), got '{cfg.llm}'")
        c.n_layer, c.n_head, c.n_embd = GPT2_SHAPES[cfg.llm]  # for the tables' titles
        c.max_text_tokens = 1024 - c.n_task_tokens - c.seq_len  # the soft prompt's come on top
    return c


def user_positions(model, hist):
    """(P soft-prompt positions in front of the text, M user embeddings the LLM attends to) for a
    batch's history."""
    if model.fusion == "none":
        return 0, 0
    with torch.no_grad():
        ctx = model.context(hist)
    if "prefix" in ctx:
        P = ctx["prefix"].size(1)  # (B, n_task + M, C)
        return P, P - model.soft_prompt.task.size(0)
    return 0, ctx["user"].size(1)  # (B, M, D)


def count_flops(model, batch):
    """Forward + backward FLOPs of one training batch: (total, user side = encoder + Perceiver +
    soft-prompt MLP). The user side is counted in a second pass over model.context alone (backward
    from its outputs), since the module attribution of backward ops is unreliable; the LLM part
    (with its cross-attention blocks) is the difference."""
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa_flops()) as total:
        model(batch).backward()
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa_flops()) as side:
        outs = [v for v in model.context(batch["hist"]).values() if v.requires_grad]
        if outs:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    model.zero_grad(set_to_none=True)
    return total.get_total_flops(), side.get_total_flops()


@torch.no_grad()
def time_answer(model, d, prompter, targets, seq_len, max_new):
    """Median ms to generate one answer (batch 1, greedy, exactly max_new tokens with the KV cache),
    user context (encoder, Perceiver) included; the first example warms up."""
    model.eval()
    times = []
    for t in targets:
        idx = torch.tensor(prompter.prompts([t]))  # (1, T)
        t0 = time.perf_counter()
        hist = to_device(d.batch([t], seq_len), "cpu")["hist"]
        generate(model.llm, idx, max_new, **model.context(hist))
        times.append(time.perf_counter() - t0)
    model.train()
    return 1000 * statistics.median(times[1:])


def measure(cfg, d, tok, name, fusion, perceiver, text_events, train_ids, gen_ids):
    """One row of table 3: build the variant, count one batch's FLOPs, time training steps and
    answers."""
    c = variant_config(cfg)
    c.fusion, c.perceiver, c.text_events = fusion, perceiver, text_events
    c.strategy = "full" if fusion == "none" and cfg.strategy in ("enc", "proj") else cfg.strategy
    prompter = Prompter(d, tok, "next_item", text_events, 10 ** 9, c.max_answer_tokens)  # see below
    batch = to_device(prompter(d.batch(train_ids, c.seq_len), train_ids), "cpu")
    max_new = max(len(a) for a in prompter.answers) - 1  # the longest title (without eot)
    longest = max(batch["idx"].size(1), max(len(p) for p in prompter.prompts(gen_ids)) + max_new)
    c.max_text_tokens = max(c.max_text_tokens, longest)  # TextPrompt's long prompts: positions
    torch.manual_seed(cfg.seed)
    model = build_model(c, d, tok)
    B, T = batch["idx"].shape
    P, M = user_positions(model, batch["hist"])
    total, user = count_flops(model, batch)
    return dict(variant=name, T=T, P=P, M=M, llm_gflops=(total - user) / B / 1e9,
                user_gflops=user / B / 1e9, gflops=total / B / 1e9,
                ms_step=time_train_step(model, batch, cfg.steps),
                ms_answer=time_answer(model, d, prompter, gen_ids, c.seq_len, max_new),
                answer_tokens=max_new, params=sum(p.numel() for p in model.parameters()))


def cost_table(cfg, d, tok):
    """Table 3 of ours: per training example FLOPs (LLM / user side), ms per step and per answer,
    for every variant."""
    train_ids = batch_targets(d.targets("train"), 0, cfg.batch_size, cfg.seed)
    gen_ids = seeded_subset(d.targets("test"), cfg.gen_examples + 1, cfg.seed)
    rows = [measure(cfg, d, tok, name.format(n=cfg.seq_len), fusion, perceiver,
                    cfg.seq_len if events is None else events, train_ids, gen_ids)
            for name, fusion, perceiver, events in VARIANTS]
    for r in rows:
        r["vs_textprompt"] = rows[0]["gflops"] / r["gflops"]  # FLOPs saved per training example
    return rows


# --------------------------------------------------------------------------------------------------
# 4. what each strategy trains (Table 5)

ML20M_VOCAB = (26_745, 21, 11)  # ML-20M: 26,744 rated movies, 20 genres, 10 half stars (+ padding)
ML20M_ENCODER = dict(feature_dims=(256, 32, 32), n_embd=256, n_layer=4, n_head=8)  # ml20m.py


def strategy_rows(shape, c, enc, vocab_sizes, llm_shape):
    """Parameters of a UserLLM, all and trained, for each strategy (Sec 3.2.3); built on the meta
    device: no memory, no time."""
    rows = []
    for strategy in ("full", "lora", "enc", "proj"):
        c.strategy = strategy
        llm = dict(llm_shape, d_user=enc["n_embd"], xattn_every=c.xattn_every,
                   xattn_dim=c.xattn_dim, xattn_ffw=c.xattn_ffw, lora_alpha=c.lora_alpha,
                   lora_rank=c.lora_rank if strategy == "lora" else 0)
        events = userllm.history_positions(c.seq_len)
        with torch.device("meta"):
            m = build_model(c, None, None, dict(enc, vocab_sizes=vocab_sizes, block_size=events),
                            llm)
        count = lambda ps: sum(p.numel() for p in ps)
        trained = count(p for p in m.parameters() if p.requires_grad)
        rows.append(dict(shape=shape, xattn=f"{c.xattn_every}, {c.xattn_dim}, {c.xattn_ffw}",
                         strategy=strategy,
                         all=count(m.parameters()) / 1e6, trained=trained / 1e6,
                         fusion=count(m.llm.xattn.parameters()) / 1e6,
                         share=trained / count(m.parameters())))
    return rows


def strategy_table(cfg, d):
    """Table 5's parameter counts: the demo's User-LLM (this config's shape, the data's vocabulary)
    and GPT-2 small with ML-20M's encoder (configs/ml20m.py) and vocabulary; a cross-attention
    block before every LLM block or every 4th, at the LLM's widths (attention C, FFW 4C) or narrow
    (attention C/4, FFW C)."""
    rows = []
    n_layer, n_head, n_embd = GPT2_SHAPES["gpt2"]
    gpt2 = dict(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    for every, narrow in ((1, False), (4, False), (1, True), (4, True)):
        c = variant_config(cfg)
        c.fusion, c.xattn_every = "xattn", every
        demo = dict(feature_dims=c.enc_feature_dims, n_embd=c.enc_n_embd, n_layer=c.enc_n_layer,
                    n_head=c.enc_n_head)
        llm = dict(block_size=c.max_text_tokens + c.n_task_tokens + c.seq_len,
                   vocab_size=get_tokenizer("scratch").n_vocab, n_layer=c.n_layer, n_head=c.n_head,
                   n_embd=c.n_embd)
        for shape, enc, vocab, llm in ((f"demo ({c.n_layer}x{c.n_embd})", demo, d.vocab_sizes, llm),
                                       ("GPT-2 small, ML-20M", ML20M_ENCODER, ML20M_VOCAB, gpt2)):
            c.xattn_dim, c.xattn_ffw = (llm["n_embd"] // 4, llm["n_embd"]) if narrow else (0, 0)
            rows += strategy_rows(shape, c, enc, vocab, llm)
    return sorted(rows, key=lambda r: r["shape"] != rows[0]["shape"])  # demo first (stable)


# --------------------------------------------------------------------------------------------------
# 5. what the paper-scale runs cost (the ML-20M configs, projected to 8 GPUs)

SCALE_CONFIGS = ("ml20m.py", "ml20m_enc.py", "ml20m_full.py", "ml20m_lora.py", "ml20m_proj.py",
                 "ml20m_perceiver.py", "ml20m_softprompt.py", "ml20m_tp50.py",
                 "ml20m_tp100.py", "ml20m_tp200.py", "ml20m_ar50tp10.py", "ml20m_fav.py")


def activation_bytes(loss_fn, params):
    """(loss, bytes autograd saves for the backward pass that are not parameters): the
    activations of one forward, counted once per storage."""
    seen, skip = set(), {p.data_ptr() for p in params}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key[0] not in skip:
            seen.add(key)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    return loss, sum(n for _, n in seen)


def scale_row(path, d, examples=4, gpus=8, peak=989e12, mfu=0.3):
    """One config at its own shape (GPT-2 with random weights; the encoder of configs/ml20m.py),
    measured on `examples` real training examples with full-length histories (at least N events,
    or TP-N's N: Fig. 3 trains each length on histories that long; short ones would make TP200 cost
    what TP50 does): parameters, FLOPs and activations per example; then per step, per GPU (fp32
    weights, gradients and AdamW's two moments for what trains, activations at the per-GPU
    micro-batch batch_size / grad_accum) and hours on `gpus` GPUs of `peak` FLOP/s at `mfu`
    utilisation."""
    enc = configure(encoder.DEFAULTS, [os.path.join(HERE, "configs", "ml20m.py")])
    is_llm = "task" in run_config_file(path)
    if is_llm:
        c = configure(userllm.DEFAULTS, [path, "--random_weights=True", "--encoder_ckpt=",
                                         f"--enc_feature_dims={enc.feature_dims}",
                                         f"--enc_n_embd={enc.n_embd}",
                                         f"--enc_n_layer={enc.n_layer}",
                                         f"--enc_n_head={enc.n_head}"])
        tok = get_tokenizer(c.llm)
        model = build_model(c, d, tok)
        prompter = Prompter(d, tok, c.task, c.text_events, c.max_text_tokens, c.max_answer_tokens)
        make = lambda ids: prompter(d.batch(ids, c.seq_len), ids)
    else:
        c = configure(encoder.DEFAULTS, [path])
        model = encoder.make_encoder(encoder.encoder_config(c, d.vocab_sizes))
        make = lambda ids: d.batch(ids, c.seq_len)
    train = d.targets("train")
    history = train - d.offsets[d.user_of(train)]  # events before each target
    train = train[history >= max(c.seq_len, getattr(c, "text_events", 0))]
    batch = to_device(make(batch_targets(train, 0, examples, 0)), "cpu")
    params = list(model.parameters())
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa_flops()) as count:
        loss, act = activation_bytes(lambda: model(batch), params)
        loss.backward()
    n_all = sum(p.numel() for p in params)
    n_trained = sum(p.numel() for p in params if p.requires_grad)
    micro = c.batch_size // c.grad_accum
    flops_step = count.get_total_flops() / examples * c.batch_size
    return dict(config=os.path.basename(path), all=n_all / 1e6, trained=n_trained / 1e6,
                gflops_example=count.get_total_flops() / examples / 1e9, batch=c.batch_size,
                micro=micro, steps=c.max_steps, pflops=flops_step * c.max_steps / 1e15,
                state_gb=(4 * n_all + 12 * n_trained) / 1e9, act_gb=act / examples * micro / 1e9,
                hours=flops_step * c.max_steps / (gpus * peak * mfu) / 3600)


def scale_table(d):
    """Section 5 for every ML-20M config (configs/ml20m*.py)."""
    return [scale_row(os.path.join(HERE, "configs", name), d) for name in SCALE_CONFIGS]


def tokenizers():
    """The two tokenizers of table 1; the GPT-2 one is skipped with a printed note when it can't be
    loaded (offline)."""
    out = {}
    try:
        out["gpt2 (r50k_base)"] = get_tokenizer("gpt2")
    except UserError as e:
        print(f"note: table 1 without the GPT-2 tokenizer: {e}")
    out["bytes (scratch)"] = get_tokenizer("scratch")
    return out


def main(argv):
    cfg = configure(DEFAULTS, argv, __doc__)
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    if cfg.scale:
        d = UserData(cfg.data_dir or os.path.join("data", "ml20m-shape"))
        rows = scale_table(d)
        print_table(rows, "5. the ML-20M configs at their own shape (GPT-2 small, random weights): "
                    "per step, per GPU, and hours on 8 H100 (989 TFLOP/s bf16) at 30% MFU",
                    [("config", "config", ""), ("params M", "all", ".1f"),
                     ("trained M", "trained", ".1f"), ("GFLOP/example", "gflops_example", ".2f"),
                     ("batch", "batch", ",d"), ("per GPU", "micro", "d"), ("steps", "steps", ",d"),
                     ("PFLOP", "pflops", ",.0f"), ("weights+grads+Adam GB", "state_gb", ".2f"),
                     ("activations GB", "act_gb", ".2f"), ("hours", "hours", ".2f")])
        print(f"on {d.path}; FLOPs: forward + backward of real training examples; activations: "
              "what autograd saves, fp32 (bf16 autocast stores about half)")
        return rows
    d = UserData(cfg.data_dir or os.path.join("data", cfg.dataset))
    shape = variant_config(cfg)  # checks llm / random_weights
    tok = get_tokenizer(cfg.llm)  # fails early, with its one-line message, before any table
    print(f"query: {QUERY['next_item']!r}; data {d.path}; torch threads {torch.get_num_threads()}")
    tokens = token_table(d, tokenizers(), (50, 100, 200), cfg.examples, cfg.seed)
    print_table(tokens, f"1. LLM input tokens per example (paper Table 3), {tokens[0]['examples']} "
                "seeded test examples",
                [("tokenizer", "tokenizer", ""), ("N", "N", "d"), ("events", "events", ".1f"),
                 ("TP-N mean", "textprompt_mean", ".1f"), ("TP-N max", "textprompt_max", "d"),
                 ("User-LLM", "userllm", ".0f"), ("paper TP-N", "paper_textprompt", "d"),
                 ("paper User-LLM", "paper_userllm", "d")])
    nd = six_nd_table(tokens)
    print_table(nd, "2. FLOPs reduction by the 6ND rule = TextPrompt / User-LLM tokens (Sec 4.4)",
                [("tokenizer", "tokenizer", ""), ("N", "N", "d"), ("paper tokens", "paper", ""),
                 ("paper", "paper_reduction", ".1f"), ("our tokens", "ours", ""),
                 ("ours", "ours_reduction", ".1f")])
    cost = cost_table(cfg, d, tok)
    llm = shape.llm if cfg.llm == "scratch" else cfg.llm
    llm += ", random weights" if cfg.random_weights else ""
    print_table(cost, f"3. measured cost per training example, batch {cfg.batch_size}, "
                f"N={cfg.seq_len}, GPT n_layer={shape.n_layer} n_embd={shape.n_embd} ({llm}), "
                f"strategy {cfg.strategy}",
                [("variant", "variant", ""), ("T", "T", "d"), ("P", "P", "d"), ("M", "M", "d"),
                 ("LLM GFLOPs", "llm_gflops", ".3f"), ("user GFLOPs", "user_gflops", ".4f"),
                 ("total GFLOPs", "gflops", ".3f"), ("saving", "vs_textprompt", ".1f"),
                 ("ms/step", "ms_step", ".0f"), ("ms/answer", "ms_answer", ".1f")])
    print(f"T: text tokens (the batch's padded length); P: soft-prompt positions "
          f"(n_task={cfg.n_task_tokens} + M); M: user embeddings the LLM sees. FLOPs: forward + "
          "backward per example; user = encoder + Perceiver + soft-prompt MLP. ms/answer: batch 1, "
          f"greedy, {cost[0]['answer_tokens']} tokens (the longest title).")
    params = strategy_table(cfg, d)
    print_table(params, "4. parameters (millions) each strategy trains (paper Table 5, Sec 3.2.3)",
                [("shape", "shape", ""), ("xattn every, dim, ffw", "xattn", ""),
                 ("strategy", "strategy", ""), ("all", "all", ".2f"), ("trained", "trained", ".2f"),
                 ("share", "share", ".1%"), ("cross-attention", "fusion", ".2f")])
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump(dict(config=vars(cfg), tokens=tokens, six_nd=nd, cost=cost, params=params), f,
                  indent=2)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    cli(main)

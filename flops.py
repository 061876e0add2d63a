"""
The paper's efficiency claims, measured (paper Table 3 and Sec 4.4): User-LLM hands the LLM a short fixed query and puts
the user history in embeddings, where TextPrompt spells the history out as text.

    python data.py && python flops.py                  # synthetic default, the demo's scratch GPT: < 1 min on CPU
    TIKTOKEN_CACHE_DIR=../shared/tiktoken python flops.py --llm=gpt2 --random_weights=True --batch_size=2 --steps=2

Three tables, printed and written as JSON to --out (default out/flops.json):
1. tokens (Table 3): LLM input tokens per example, TextPrompt TP-N (the last N events as text, then the query) for
   N = 50/100/200 vs User-LLM (the query only), measured on a seeded sample of test examples, with the GPT-2 tokenizer
   (tiktoken r50k_base; skipped with a note when it can't be loaded) and the scratch GPT's byte-level one.
2. the 6·N·D rule (Sec 4.4): training FLOPs ~ 6 x parameters x tokens, so on the same LLM the saving is the token
   ratio: the paper's 32 vs 700/1350/2500 tokens -> 21.9x/42.2x/78.1x, side by side with ours.
3. measured cost of one training step (forward + backward + AdamW) and of one generated answer, on one real training
   batch, for TextPrompt TP50 and User-LLM (cross-attention / soft prompt, each with and without the Perceiver
   50 -> 16), on the same GPT, *including* the user encoder and Perceiver that the paper's count leaves out.

FLOPs are counted by torch.utils.flop_counter (matmuls and attention; elementwise ops, softmax and LayerNorm are not
counted; attention is counted over the full T x T square, as the counter does for causal kernels on GPU too).
`--llm=gpt2 --random_weights=True`: a GPT-2-small-shaped model with random weights (GPT-2's weights aren't available
offline; FLOPs and time don't depend on weight values); the other GPT-2 sizes work the same way.

Dimension letters: B batch, T text tokens (padded batch length), P soft-prompt positions (n_task + M), M user
embeddings the LLM sees (N events, or the Perceiver's latents), N history events.
"""
import json
import os
import statistics
import sys
import time
import types

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import train_llm
from common import adamw, configure, seeded_subset, to_device
from data import UserData, batch_targets
from model import GPT2_NAMES
from train_llm import QUERY, Prompter, build_model, get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
# train_llm.py keys that set a model's shape; their defaults are the demo's (configs/synthetic_llm.py)
SHAPE_KEYS = ("seq_len", "n_layer", "n_head", "n_embd", "block_size", "n_latents", "perceiver_layers", "n_task_tokens",
              "enc_feature_dims", "enc_n_embd", "enc_n_layer", "enc_n_head", "xattn_every", "xattn_dim",
              "max_answer_tokens")
DEMO = vars(configure(train_llm.DEFAULTS, [os.path.join(HERE, "configs", "synthetic_llm.py")]))
DEFAULTS = dict(
    dataset="synthetic", data_dir="", examples=200,  # table 1: test examples tokenized
    out="out/flops.json", llm="scratch", random_weights=False,  # random_weights: a GPT-2-shaped model, no download
    strategy="full",  # what trains in table 3 (6ND assumes all LLM weights train); TextPrompt: 'full' for enc/proj
    batch_size=8, steps=3, gen_examples=3,  # table 3: one training batch, timed steps (+1 warmup), answers timed
    threads=0, seed=1337,
    encoder="",  # a train_encoder.py config: print only table 4, that encoder's training throughput  # threads 0: every core this process may use (on a busy machine 1 times more steadily)
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
    prompter = Prompter(d, tok, "next_item", text_events, block_size=0, max_answer_tokens=1)  # prompts() only
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
    c = types.SimpleNamespace(**{**train_llm.DEFAULTS, **{k: getattr(cfg, k) for k in SHAPE_KEYS}})
    c.llm, c.task, c.encoder_ckpt = cfg.llm, "next_item", ""  # a random encoder: its shape is what costs
    if cfg.llm != "scratch" and cfg.random_weights:
        if cfg.llm not in GPT2_SHAPES:
            raise SystemExit(f"config: random_weights needs llm in {', '.join(GPT2_NAMES)} (or 'scratch'), "
                             f"got '{cfg.llm}'")
        c.llm, (c.n_layer, c.n_head, c.n_embd) = "scratch", GPT2_SHAPES[cfg.llm]
        c.block_size = 1024 - c.n_task_tokens - c.seq_len  # build_model adds the soft prompt's positions back
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
        model.llm.generate(idx, max_new, **model.context(d.batch([t], seq_len)["hist"]))
        times.append(time.perf_counter() - t0)
    model.train()
    return 1000 * statistics.median(times[1:])


def measure(cfg, d, tok, name, fusion, perceiver, text_events, train_ids, gen_ids):
    """One row of table 3: build the variant, count one batch's FLOPs, time training steps and answers."""
    c = llm_config(cfg)
    c.fusion, c.perceiver, c.text_events = fusion, perceiver, text_events
    c.strategy = "full" if fusion == "none" and cfg.strategy in ("enc", "proj") else cfg.strategy
    prompter = Prompter(d, tok, "next_item", text_events, 10 ** 9, c.max_answer_tokens)  # length checked below
    batch = prompter(d.batch(train_ids, c.seq_len), train_ids)
    max_new = max(len(a) for a in prompter.answers) - 1  # the longest title (without eot)
    longest = max(batch["idx"].size(1), max(len(p) for p in prompter.prompts(gen_ids)) + max_new)
    c.block_size = max(c.block_size, longest)  # TextPrompt's long prompts get positions (embeddings cost no FLOPs)
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

# ----------------------------------------------------------------------------------------------------------------------
# 4. encoder pretraining throughput (train_encoder.py; issue benchmark)

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 per GPU; other devices: no MFU shown


def encoder_table(config_path, d, batch_size, steps, device):
    """Events/s and achieved FLOP/s of one training step (forward, backward, AdamW) of a train_encoder.py config's
    encoder on dataset d; MFU against the device's peak where it is known."""
    import train_encoder
    from encoder import make_encoder
    c = configure(train_encoder.DEFAULTS, [config_path])
    model = make_encoder(train_encoder.encoder_config(c, d)).to(device)
    ids = seeded_subset(d.targets("train"), batch_size, 0)
    batch = to_device(d.batch(ids, c.seq_len), device)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model(batch).backward()
    model.zero_grad(set_to_none=True)
    ms = time_train_step(model, batch, steps)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    achieved = counter.get_total_flops() / (ms / 1000)
    return [dict(config=os.path.basename(config_path), params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                 batch=len(ids), N=c.seq_len, ms_step=ms, events_per_s=len(ids) * c.seq_len / (ms / 1000),
                 gflops_per_s=achieved / 1e9, device=name, mfu=f"{100 * achieved / peak:.1f}%" if peak else "n/a")]


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


def main(argv):
    cfg = configure(DEFAULTS, argv)
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    d = UserData(cfg.data_dir or os.path.join("data", cfg.dataset))
    if cfg.encoder:  # only the encoder benchmark
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows = encoder_table(cfg.encoder, d, cfg.batch_size, cfg.steps, device)
        print_table(f"4. encoder training step (forward, backward, AdamW), data {d.path}", rows,
                    [("config", "config", ""), ("params (M)", "params_m", ".2f"), ("batch", "batch", "d"),
                     ("N", "N", "d"), ("ms/step", "ms_step", ".0f"), ("events/s", "events_per_s", ",.0f"),
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

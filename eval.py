"""
Evaluation (paper Sec 4, Tables 2, 5-8): the test split, once, from a checkpoint chosen on validation.

    python eval.py --ckpt=out/synthetic-enc/best.pt     # an encoder: Recall@1/5/10, NDCG@10 (+ most popular)
    python eval.py --ckpt=out/synthetic-llm/best.pt     # a User-LLM / TextPrompt model: its task's metrics
    (--max_examples=K: a seeded subset. Next item: recall@k ranks every title by log-likelihood (exact), beam_recall@k
    comes from beam search with --beam=10 beams; --beam=0: no beam search, --exact=False: no exact ranking)
    python eval.py --runs=out/a,out/b --fig3=fig3.svg --curves=loss.svg   # plots of runs evaluated before
    python eval.py --runs=out/a,out/b --time_to_quality=t.svg   # validation recall against training CPU-seconds
    python eval.py --summary=True --runs='out/syn-*'   # runs evaluated before, as mean ± sd over their seeds
    python eval.py --ckpt=out/synthetic-gpt/best.pt --catalogue=True   # does an LLM without context know the titles?
    (its one ranking, the same for every user, is scored on every user of --split beside most popular: exact, fast)

Encoders (Table 2): every example is scored against every item of the catalogue (padding excluded). Nothing is
filtered: items already in the history stay in the ranking. Ties count against the target (its rank is 1 + the number
of other items scoring >= it), so a constant scorer gets no credit. A DualEnc trained on the favourite genre/category
is ranked over all genres/categories.
LLMs (Sec 4.2): next item -> every title of the catalogue ranked by its summed log-probability (no length
normalisation): the exact ranking, the headline (recall@k, ndcg@10); beside it, the paper-style generation: beam search
constrained to the catalogue by a prefix trie over the tokenized titles (each ended by end-of-text), beam_recall@k,
which misses titles the beams drop early and so under-reports. Favourite genre/category -> every candidate ranked by
log-likelihood; review generation -> greedy decoding scored by rouge-score (F1). Ranking every candidate runs each
prompt once and scores the candidates' prefix trie after its KV cache, a chunk at a time: exact, in memory that does
not grow with the catalogue (see answer_logprobs).
Prints a table and writes eval_<split>.json beside the checkpoint.
"""
import glob
import json
import os
import sys
import types
from collections import namedtuple
from xml.sax.saxutils import escape

import numpy as np
import torch

from common import (TRAIN_DEFAULTS, check_data, configure, data_path, evaluate_ranking, load_checkpoint, load_weights,
                    ranking_metrics, seeded_subset, to_device)
from data import Prompter, UserData, get_tokenizer, popularity
from encoder import EncoderConfig, make_encoder
from model import KVCache, beam_search, generate, tree_logits
from sources import oracle_recall
from userllm import DEFAULTS as LLM_DEFAULTS, build_model

DEFAULTS = dict(ckpt="", split="test", data_dir="", batch_size=64, max_examples=0, seed=1337, device="cpu",
                beam=10, exact=True,  # LLMs, next item: beams for beam search (0: none); exact: rank every title
                runs="", fig3="", curves="", time_to_quality="", metric="recall@10",  # plots of runs (plot_fig3)
                summary=False,  # --runs='out/x-s*,...' (patterns): a table of mean ± sd over seeds (see summarize)
                catalogue=False)  # an LLM without user context, next item: how well it knows the catalogue


class Trie:
    """Prefix trie over the catalogue's answers (token lists ending with eot, unique: see data.unique_names). Plugged
    into model.beam_search as `allowed`, it keeps every hypothesis a real catalogue entry."""

    def __init__(self, answers):
        self.root, self.ids = {}, {}
        for i, seq in enumerate(answers):
            if i == 0:
                continue  # padding is no answer
            node = self.root
            for t in seq:
                node = node.setdefault(t, {})
            self.ids[tuple(seq)] = i

    def allowed(self, rows):
        """For each generated-so-far token list, the tokens that continue it to a catalogue entry."""
        out = []
        for row in rows:
            node = self.root
            for t in row:
                node = node[t]
            out.append(list(node))
        return out


def by_prompt_length(prompts, batch_size):
    """Batches of example positions whose prompts have equal length (beam search and answer_logprobs take those)."""
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for members in groups.values():
        for j in range(0, len(members), batch_size):
            yield members[j:j + batch_size]


TREE_NODES = 128  # trie nodes per model.tree_logits call in answer_logprobs: at most B x this many tokens a call
TrieChunk = namedtuple("TrieChunk", "tokens parent ids pred target")


def trie_chunks(answers, max_nodes=TREE_NODES):
    """Split the prefix trie of the answers (token lists) into sub-tries of whole answers and at most max_nodes internal
    nodes each (more only for one answer longer than that), for answer_logprobs. The answers go in sorted order, so
    neighbours share their prefixes and a chunk holds each shared prefix once; a prefix split between two chunks is
    held by both (a few % more tokens). The internal nodes are the answers' proper prefixes: the last token of an
    answer is only predicted, never fed."""
    order = sorted(range(len(answers)), key=lambda c: list(answers[c]))
    chunks, group, nodes = [], [], {}  # nodes: the chunk's internal nodes, prefix tuple -> index, parents first
    for c in order:
        prefixes = [tuple(answers[c][:i]) for i in range(1, len(answers[c]))]
        if group and len(nodes) + sum(p not in nodes for p in prefixes) > max_nodes:
            chunks.append(trie_chunk(answers, group, nodes))
            group, nodes = [], {}
        group.append(c)
        for p in prefixes:
            nodes.setdefault(p, len(nodes))
    return chunks + [trie_chunk(answers, group, nodes)] if group else chunks


def trie_chunk(answers, group, nodes):
    """One sub-trie: tokens (T,) and parent (T,) of its internal nodes (-1: right after the prompt), as
    model.tree_logits takes them; ids (n,) of its answers; and for each answer token, (n, L) padded: pred, the position
    whose logits predict it (0: the prompt's last token, j + 1: node j), and target, the token (-1: padding)."""
    tokens = torch.tensor([p[-1] for p in nodes], dtype=torch.long)
    parent = torch.tensor([nodes.get(p[:-1], -1) for p in nodes], dtype=torch.long)
    L = max(len(answers[c]) for c in group)
    pred = torch.zeros(len(group), L, dtype=torch.long)
    target = torch.full((len(group), L), -1, dtype=torch.long)
    for r, c in enumerate(group):
        a = list(answers[c])
        pred[r, :len(a)] = torch.tensor([0] + [1 + nodes[tuple(a[:i])] for i in range(1, len(a))])
        target[r, :len(a)] = torch.tensor(a)
    return TrieChunk(tokens, parent, torch.tensor(group, dtype=torch.long), pred, target)


@torch.no_grad()
def answer_logprobs(llm, idx, context, answers, chunks=None):
    """Summed log-probability of every candidate answer after each prompt: idx (B, P) -> (B, C). Exact ranking.
    The prompt runs once with its user context; its KV cache then serves every chunk of the answers' prefix trie
    (trie_chunks(answers); pass them as chunks to score the same answers many times), one model.tree_logits call
    each, so a prefix that answers share is computed once per chunk and no answer is padded.
    Memory, whatever C: a call feeds B x T tokens, T <= max(TREE_NODES, the longest answer), and its largest tensors
    are the (B, T, V) logits and log-probabilities and the attention's (B, n_head, T, P + T) scores; besides the
    prompt's own forward, only the (B, C) result grows with C."""
    B, dev = idx.size(0), idx.device
    cache = KVCache(llm.config.n_layer)
    logits, _ = llm(idx, cache=cache, **context)
    first = torch.log_softmax(logits[:, -1:].float(), dim=-1)  # (B, 1, V): predicts every answer's first token
    scores = torch.empty(B, len(answers), device=dev)
    for ch in trie_chunks(answers) if chunks is None else chunks:
        logp = first
        if len(ch.tokens):
            logits = tree_logits(llm, ch.tokens.to(dev).expand(B, -1), ch.parent.to(dev), cache)  # (B, T, V)
            logp = torch.cat([first, torch.log_softmax(logits.float(), dim=-1)], dim=1)  # (B, 1 + T, V)
        pred, target = ch.pred.to(dev), ch.target.to(dev)
        picked = logp[:, pred, target.clamp(min=0)]  # (B, n, L): the log-probability of each answer token
        scores[:, ch.ids.to(dev)] = torch.where(target >= 0, picked, 0.0).sum(2)
    return scores


@torch.no_grad()
def evaluate_llm(model, prompter, d, targets, seq_len, device, batch_size=32, beam=10, exact=False):
    """Task metrics of a UserLLM (Sec 4.2): next item -> Recall@1/5/10 and NDCG@10 from ranking every title by
    log-likelihood (exact=True) and beam_recall@1/5/10 from catalogue-constrained beam search (beam > 0);
    favourite genre/category -> Recall@1/5/10 by ranking every candidate by log-likelihood; review generation ->
    ROUGE-1/2/L/Lsum F1 of greedy decoding."""
    prompts, sums, n = prompter.prompts(targets), {}, 0
    trie = Trie(prompter.answers) if prompter.task == "next_item" and beam else None
    rank_all = prompter.task != "review_gen" and (trie is None or exact)
    chunks = trie_chunks(prompter.answers[1:]) if rank_all else None  # the catalogue's trie, split once
    for group in by_prompt_length(prompts, batch_size):
        ids = targets[group]
        batch = to_device(d.batch(ids, seq_len), device)
        idx = torch.tensor([prompts[i] for i in group], device=device)
        context = model.context(batch["hist"])
        metrics = {}
        if prompter.task == "review_gen":
            metrics = rouge(model.llm, idx, context, [d.review(t) for t in ids], prompter)
        else:
            label = (batch["fav"] if prompter.task == "fav" else batch["target"][0]).tolist()
            if trie is not None:
                hyps = beam_search(model.llm, idx, beam, max(map(len, prompter.answers)), eos=prompter.eot,
                                   allowed=trie.allowed, **context)
                ranked = [[trie.ids[tuple(h)] for h, _ in hs] for hs in hyps]
                metrics.update({f"beam_recall@{k}": np.mean([y in r[:k] for y, r in zip(label, ranked)])
                                for k in (1, 5, 10)})
            if rank_all:
                scores = answer_logprobs(model.llm, idx, context, prompter.answers[1:], chunks)  # (B, C) ids 1..C
                metrics.update(ranking_metrics(torch.cat([torch.full_like(scores[:, :1], -np.inf), scores], 1),
                                               torch.tensor(label, device=device)))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(group)
        n += len(group)
    return {k: v / n for k, v in sums.items()}


def rouge(llm, idx, context, references, prompter):
    """Greedy-decode reviews and score them against the user's real reviews with rouge-score (F1, stemmed)."""
    from rouge_score import rouge_scorer
    out = generate(llm, idx, prompter.max_answer + 1, eos=prompter.eot, **context)[:, idx.size(1):].tolist()
    texts = [prompter.tok.decode([t for t in row if t != prompter.eot]) for row in out]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    scores = [scorer.score(ref, hyp) for ref, hyp in zip(references, texts)]
    return {k: np.mean([s[k].fmeasure for s in scores]) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}


def reference_rows(d, split, targets, seq_len, label, batch_size, device):
    """What a result is measured against: most popular (training counts) and, on the synthetic default, the oracle's
    expected Recall@K (the true next-item distribution, the user's hidden taste included: nothing can beat it)."""
    pop = torch.from_numpy(popularity(d, 0 if label == "item" else 1)).to(device)
    rows = {"most popular": evaluate_ranking(lambda h: pop.expand(len(h[0]), -1), d, targets, seq_len, label,
                                             batch_size, device)}
    if d.meta["dataset"] == "synthetic" and label == "item" and split in ("val", "test"):
        rows["oracle (expected)"] = oracle_recall(d, split, (1, 5, 10), targets)
    return rows


def print_table(rows):
    """rows: {name: {metric: value}} -> an aligned text table: every metric any row has, in order of appearance (a
    metric a row lacks is left blank)."""
    metrics = list(dict.fromkeys(m for r in rows.values() for m in r))
    width = max(len(name) for name in rows) + 2
    col = {m: max(11, len(m) + 2) for m in metrics}
    print(" " * width + "".join(f"{m:>{col[m]}s}" for m in metrics))
    for name, r in rows.items():
        print(f"{name:{width}s}" + "".join(f"{r[m]:{col[m]}.4f}" if m in r else " " * col[m] for m in metrics))


def checkpoint_data(ckpt, cfg):
    """The dataset a checkpoint was trained on (or --data_dir=), refused if it is not the same data."""
    d = UserData(data_path(ckpt.get("data"), cfg.data_dir, cfg.ckpt))
    check_data(ckpt.get("data"), d.fingerprint(), cfg.ckpt)
    return d


def evaluate_encoder_checkpoint(cfg, ckpt):
    tcfg = ckpt["config"]
    model = make_encoder(EncoderConfig(**ckpt["encoder_config"])).to(cfg.device)
    load_weights(model, ckpt["model"], cfg.ckpt)
    model.eval()
    d = checkpoint_data(ckpt, cfg)
    targets = seeded_subset(d.targets(cfg.split), cfg.max_examples, cfg.seed)
    label = model.cfg.label
    rows = {f"{model.cfg.kind} encoder": evaluate_ranking(model.scores, d, targets, tcfg["seq_len"], label,
                                                           cfg.batch_size, cfg.device)}
    rows.update(reference_rows(d, cfg.split, targets, tcfg["seq_len"], label, cfg.batch_size, cfg.device))
    what = "next item" if label == "item" else f"favourite {d.features[1]}"
    print(f"{what}, {cfg.split} split, {len(targets)} examples, full ranking over "
          f"{d.vocab_sizes[0 if label == 'item' else 1] - 1} candidates")
    return rows


def describe(c):
    """A results-table name for a train_llm.py run (a rerun with another seed gets its own name)."""
    if c.fusion == "none":
        name = (f"TextPrompt TP{c.text_events}" if c.text_events else "no user context") + f" ({c.strategy})"
        mixed = getattr(c, "mixed_history", 0)  # absent from configs written before it existed
        name += f" reading 0-{mixed} events" if mixed else ""  # a stand-in pretrained with written histories
    else:
        name = {"xattn": "User-LLM", "soft_prompt": "soft prompt"}[c.fusion] + f" N={c.seq_len} ({c.strategy})"
        name += f" +Perceiver{c.n_latents}" if c.perceiver else ""
        name += f" +TP{c.text_events}" if c.text_events else ""
        name += "" if c.encoder_ckpt else " random enc"
    name += " from a trained GPT" if c.llm_ckpt else ""
    name += f" [{c.task}]" if c.task != "next_item" else ""
    return name + (f" seed {c.seed}" if c.seed != TRAIN_DEFAULTS["seed"] else "")


def llm_config(ckpt):
    """A train_llm.py checkpoint's config; a key added to userllm.DEFAULTS after it was written takes its default
    (e.g. pack_examples: 0, what runs did before it existed), so older checkpoints still evaluate."""
    return types.SimpleNamespace(**{**LLM_DEFAULTS, **ckpt["config"]})


def load_llm_checkpoint(cfg, ckpt):
    """(its config, its data, its tokenizer, the UserLLM in eval mode) of a train_llm.py checkpoint."""
    tcfg = llm_config(ckpt)
    d = checkpoint_data(ckpt, cfg)
    tok = get_tokenizer(tcfg.llm)
    model = build_model(tcfg, d, tok, ckpt["encoder_config"], ckpt["llm_config"]).to(cfg.device)
    load_weights(model, ckpt["model"], cfg.ckpt)
    return tcfg, d, tok, model.eval()


def evaluate_llm_checkpoint(cfg, ckpt):
    tcfg, d, tok, model = load_llm_checkpoint(cfg, ckpt)
    prompter = Prompter(d, tok, tcfg.task, tcfg.text_events, tcfg.max_text_tokens, tcfg.max_answer_tokens)
    targets = seeded_subset(d.targets(cfg.split), cfg.max_examples, cfg.seed)
    torch.manual_seed(cfg.seed)
    rows = {describe(tcfg): evaluate_llm(model, prompter, d, targets, tcfg.seq_len, cfg.device, cfg.batch_size,
                                         cfg.beam, cfg.exact)}
    if tcfg.task != "review_gen":
        rows.update(reference_rows(d, cfg.split, targets, tcfg.seq_len, "item" if tcfg.task == "next_item" else "fav",
                                   cfg.batch_size, cfg.device))
    print(f"{tcfg.task}, {cfg.split} split, {len(targets)} examples" +
          (f"; recall@k, ndcg@10: every title ranked by log-likelihood (exact)" if tcfg.task == "next_item" and
           (cfg.exact or not cfg.beam) else "") +
          (f"; beam_recall@k: beam search ({cfg.beam} beams) constrained to the catalogue"
           if tcfg.task == "next_item" and cfg.beam else ""))
    return rows


def average_ranks(x):
    """Ranks 0..n-1 of x, ties sharing their average rank (as Spearman's correlation needs)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts  # the first rank of each distinct value
    return (start + (counts - 1) / 2)[inverse]


@torch.no_grad()
def catalogue_fit(cfg, ckpt):
    """How well an LLM without user context (next item, no history text) knows the catalogue. Its prompt is the same
    for every user, so its ranking is one list: Recall@k is the share of targets in its top k, and a pretrained LLM
    should rank as most-popular does. Returns the probability its titles hold after the query (the rest goes to strings
    that are no title: it cannot spell them all yet), the Spearman correlation of their log-probabilities with the
    training counts, how many of its top 10 are among the 10 most watched, and (rows) that one list's Recall@k on every
    target of --split beside most popular's: exact, from one forward pass, so it settles on all users what a subset
    cannot (--split=train: the share of the training targets its top k covers; most popular's is the most any one
    list can cover)."""
    tcfg = llm_config(ckpt) if "llm_config" in ckpt else None
    if tcfg is None or tcfg.task != "next_item" or tcfg.fusion != "none" or tcfg.text_events:
        what = ("an encoder" if tcfg is None else
                f"task {tcfg.task}, fusion {tcfg.fusion}, text_events {tcfg.text_events}")
        raise SystemExit(f"eval.py: --catalogue=True needs an LLM trained without user context on the next item "
                         f"(task next_item, fusion none, text_events 0); {cfg.ckpt} is {what}")
    tcfg, d, tok, model = load_llm_checkpoint(cfg, ckpt)
    prompter = Prompter(d, tok, tcfg.task, 0, tcfg.max_text_tokens, tcfg.max_answer_tokens)
    idx = torch.tensor(prompter.prompts(d.targets("train")[:1]), device=cfg.device)  # (1, P): every user's prompt
    logp = answer_logprobs(model.llm, idx, {}, prompter.answers[1:])[0].cpu().numpy()  # (C,) items 1..C
    counts = popularity(d)[1:]
    top = lambda x: set(np.argsort(-x, kind="stable")[:10].tolist())
    targets = d.targets(cfg.split)
    scores = torch.from_numpy(np.concatenate([[-np.inf], logp]).astype(np.float32)).to(cfg.device)  # (V,) 0: padding
    rows = {"its one list": evaluate_ranking(lambda h: scores.expand(len(h[0]), -1), d, targets, tcfg.seq_len, "item",
                                             cfg.batch_size, cfg.device)}
    rows.update(reference_rows(d, cfg.split, targets, tcfg.seq_len, "item", cfg.batch_size, cfg.device))
    return {"catalogue mass": float(np.exp(logp.astype(np.float64)).sum()),
            "spearman vs counts": float(np.corrcoef(average_ranks(logp), average_ranks(counts))[0, 1]),
            "top-10 overlap": len(top(logp) & top(counts)), "examples": len(targets), "rows": rows}


# ----------------------------------------------------------------------------------------------------------------------
# plots, as SVG files written by hand (no plotting library needed)

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def ticks(lo, hi, log=False):
    """Round tick values in [lo, hi]: about 5 steps of 1, 2 or 5 x 10^k; on a log axis 1, 2, 3, 5 x each power of 10."""
    if log:
        return [m * 10.0 ** k for k in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
                for m in (1, 2, 3, 5) if lo <= m * 10.0 ** k <= hi]
    step = 10.0 ** np.floor(np.log10((hi - lo) / 5 or 1))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= 5)
    return list(np.arange(np.ceil(lo / step) * step, hi + step * 1e-6, step))


def svg_chart(path, series, title, xlabel, ylabel, log_y=False):
    """A line chart: series = {label: (xs, ys)}, one coloured line each (with dots when it has few points)."""
    right = 60 + 7 * max(len(label) for label in series)  # the right margin holds the legend
    W, H, left, top, bottom = 500 + right, 420, 70, 40, 50
    f = (lambda y: np.log10(max(y, 1e-9))) if log_y else (lambda y: y)
    title, xlabel, ylabel = escape(title), escape(xlabel), escape(ylabel)
    xs = [x for xv, _ in series.values() for x in xv]
    ys = [f(y) for _, yv in series.values() for y in yv]
    x0, x1 = min(xs), max(xs)
    y0, y1 = (min(ys), max(ys)) if log_y else (min(0.0, min(ys)), max(ys) * 1.05)
    px = lambda x: left + (x - x0) / ((x1 - x0) or 1) * (W - left - right)
    py = lambda y: H - bottom - (f(y) - y0) / ((y1 - y0) or 1) * (H - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{(W - right + left) / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
           f'<text x="{(W - right + left) / 2}" y="{H - 12}" text-anchor="middle">{xlabel}</text>',
           f'<text x="16" y="{(H - bottom + top) / 2}" text-anchor="middle" '
           f'transform="rotate(-90 16 {(H - bottom + top) / 2})">{ylabel}</text>',
           f'<path d="M{left},{top} V{H - bottom} H{W - right}" stroke="black" fill="none"/>']
    for t in ticks(10 ** y0, 10 ** y1, log_y) if log_y else ticks(y0, y1):  # y ticks, with light grid lines
        out.append(f'<path d="M{left},{py(t):.1f} H{W - right}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    for x in sorted(set(xs)) if len(set(xs)) <= 12 else ticks(x0, x1):  # x ticks: the points, or round values
        out.append(f'<text x="{px(x):.1f}" y="{H - bottom + 18}" text-anchor="middle">{x:.4g}</text>')
    for i, (label, (xv, yv)) in enumerate(series.items()):
        c, label = COLORS[i % len(COLORS)], escape(label)
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xv, yv))
        out.append(f'<polyline points="{points}" fill="none" stroke="{c}" stroke-width="2">'
                   f'<title>{label}</title></polyline>')
        if len(xv) <= 12:
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{c}"/>' for x, y in zip(xv, yv)]
        ly = top + 10 + 20 * i
        out.append(f'<path d="M{W - right + 15},{ly} h24" stroke="{c}" stroke-width="2"/>'
                   f'<text x="{W - right + 45}" y="{ly + 4}">{label}</text>')
    with open(path, "w") as fh:
        fh.write("\n".join(out + ["</svg>"]) + "\n")


def read_run(run, split="test"):
    """A train_llm.py / train_encoder.py out_dir -> (its config, its model's eval row or None, its training log)."""
    try:
        with open(os.path.join(run, "config.json")) as f:
            c = types.SimpleNamespace(**json.load(f))
        with open(os.path.join(run, "log.jsonl")) as f:
            log = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise SystemExit(f"{run}: not a training run's out_dir ({e})".splitlines()[0])
    path = os.path.join(run, f"eval_{split}.json")
    if not os.path.isfile(path):
        return c, None, log
    with open(path) as f:
        return c, next(iter(json.load(f)["results"].values())), log  # the first row is the run's own model


def summarize(runs, split="test"):
    """Results over seeds: runs whose configs differ only in seed and out_dir make one row, each metric as mean ± sd
    (sample sd) over them; then, per seed, Recall@10 and tanh of the gates at the end of training."""
    groups, pending = {}, []
    for run in runs:
        c, row, log = read_run(run, split)
        if row is None:
            pending.append(run)  # still training, or not evaluated yet
            continue
        name = describe(types.SimpleNamespace(**{**vars(c), "seed": TRAIN_DEFAULTS["seed"]})) if hasattr(
            c, "fusion") else f"{c.kind} encoder"
        gates = next(({k: v for k, v in r.items() if k[:-1] in ("attn", "ff")} for r in reversed(log) if "loss" in r),
                     {})
        groups.setdefault(name, []).append((c.seed, row, gates))
    if pending:
        print(f"skipped {len(pending)} runs without eval_{split}.json (eval.py --ckpt=<run>/best.pt): "
              + ", ".join(pending))
    if not groups:
        raise SystemExit("eval.py: --summary found no evaluated run")
    metrics = list(dict.fromkeys(m for rs in groups.values() for _, r, _ in rs for m in r))
    width = max(map(len, groups)) + 2
    print(f"{split} split, mean ± sd over seeds".ljust(width) + "seeds" + "".join(f"{m:>18s}" for m in metrics))
    for name, rs in groups.items():
        cells = [np.array([r[m] for _, r, _ in rs if m in r]) for m in metrics]
        print(f"{name:{width}s}{len(rs):5d}" + "".join(
            f"{v.mean():11.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}" if len(v) else " " * 18 for v in cells))
    key = "recall@10" if "recall@10" in metrics else metrics[0]
    print(f"per seed: {key}, and tanh of each cross-attention gate at the end of training (block's attention, FFW)")
    for name, rs in groups.items():
        for seed, r, g in sorted(rs, key=lambda x: x[0]):
            gates = " ".join(f"{k} {v:+.2f}" for k, v in g.items())
            print(f"  {name} seed {seed}: {r.get(key, float('nan')):.4f}  {gates}")
    return groups


def plot_fig3(runs, path, metric="recall@10", split="test"):
    """Paper Fig. 3: a metric against the history length N, one line per method. A User-LLM run's N is its seq_len (the
    events the encoder sees); a TextPrompt run's is its text_events (the events written into the prompt)."""
    lines = {}
    for run in runs:
        c, row, _ = read_run(run, split)
        if row is None:
            raise SystemExit(f"{run}: no eval_{split}.json, run eval.py --ckpt={run}/best.pt first")
        if metric not in row:
            raise SystemExit(f"{run}: no '{metric}' in its results (it has {', '.join(row)})")
        if not hasattr(c, "fusion"):
            raise SystemExit(f"{run}: Fig. 3 plots train_llm.py runs, this is an encoder's")
        text_only = c.fusion == "none"
        name = "TextPrompt" if text_only else describe(c).replace(f" N={c.seq_len}", "")
        lines.setdefault(name, []).append((c.text_events if text_only else c.seq_len, row[metric]))
    series = {name: tuple(zip(*sorted(pts))) for name, pts in lines.items()}
    svg_chart(path, series, f"{metric} against history length ({split} split)", "events of history N", metric)
    return series


def plot_curves(runs, path):
    """Training loss against step, one line per run (from each out_dir's log.jsonl)."""
    series = {}
    for run in runs:
        c, _, log = read_run(run)
        pts = [(r["step"], r["loss"]) for r in log if "loss" in r]
        if not pts:
            raise SystemExit(f"{run}: its log.jsonl has no training loss yet")
        name = describe(c) if hasattr(c, "fusion") else f"{c.kind} encoder"
        series[name if name not in series else f"{name} [{run}]"] = tuple(zip(*pts))
    svg_chart(path, series, "training loss", "step", "loss (log scale)", log_y=True)
    return series


def plot_time_to_quality(runs, path, metric="recall@10"):
    """Validation metric against training CPU-seconds (validation not counted), one line per run, from the validation
    rows of each out_dir's log.jsonl (they carry cpu_s): the quality a run reaches for the CPU time it spends."""
    series = {}
    for run in runs:
        c, _, log = read_run(run)
        pts = [(r["cpu_s"], r[f"val_{metric}"]) for r in log if f"val_{metric}" in r and "cpu_s" in r]
        if not pts:
            raise SystemExit(f"{run}: its log.jsonl has no validation {metric} with cpu_s")
        name = describe(c) if hasattr(c, "fusion") else (f"{c.kind} encoder" + (
            " + seen bias" if getattr(c, "seen_bias", False) else "") + (
            f" seed {c.seed}" if c.seed != TRAIN_DEFAULTS["seed"] else ""))
        series[name if name not in series else f"{name} [{run}]"] = tuple(zip(*pts))
    svg_chart(path, series, f"validation {metric} against training time", "training CPU-seconds",
              f"validation {metric}")
    return series


def main(argv):
    cfg = configure(DEFAULTS, argv, __doc__)
    if cfg.summary:
        runs = sorted(r for pattern in cfg.runs.split(",") if pattern for r in glob.glob(pattern))
        if not runs:
            raise SystemExit(f"eval.py: --summary found no run matching --runs='{cfg.runs}'")
        return summarize(runs, cfg.split)
    if cfg.fig3 or cfg.curves or cfg.time_to_quality:
        runs = [r for r in cfg.runs.split(",") if r]
        if not runs:
            raise SystemExit("eval.py: --fig3/--curves/--time_to_quality plot the runs named by --runs=out/a,out/b,...")
        for path, plot in ((cfg.fig3, lambda p: plot_fig3(runs, p, cfg.metric, cfg.split)),
                           (cfg.curves, lambda p: plot_curves(runs, p)),
                           (cfg.time_to_quality, lambda p: plot_time_to_quality(runs, p, cfg.metric))):
            if path:
                plot(path)
                print(f"wrote {path}")
        return None
    if not cfg.ckpt:
        raise SystemExit("eval.py: give a checkpoint, e.g. --ckpt=out/synthetic-enc/best.pt")
    ckpt = load_checkpoint(cfg.ckpt)
    if cfg.catalogue:
        fit = catalogue_fit(cfg, ckpt)
        print(f"{cfg.ckpt}: its titles hold {fit['catalogue mass']:.3f} of the probability after the query; Spearman "
              f"{fit['spearman vs counts']:.3f} against the training counts; {fit['top-10 overlap']} of its top 10 "
              f"are among the 10 most watched; on all {fit['examples']} targets of the {cfg.split} split:")
        print_table(fit["rows"])
        return fit
    rows = (evaluate_llm_checkpoint if "llm_config" in ckpt else evaluate_encoder_checkpoint)(cfg, ckpt)
    print_table(rows)
    out = os.path.join(os.path.dirname(cfg.ckpt), f"eval_{cfg.split}.json")
    with open(out, "w") as f:
        json.dump({"checkpoint": cfg.ckpt, "split": cfg.split, "config": vars(cfg), "results": rows}, f, indent=2)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

"""
Reports over finished runs, beside the paper's metrics (eval.py): results over seeds, the paper's
Fig. 3, training curves, time to quality, and whether a stand-in LLM knows its catalogue. Plots are
SVG files written by hand (no plotting library).

    python report.py --summary=True --runs='out/syn-s*/*'    # mean ± sd over seeds
    python report.py --runs=out/a,out/b --fig3=fig3.svg       # Recall@10 against history length
    python report.py --runs=out/a,out/b --curves=loss.svg     # training loss against step
    python report.py --runs=out/a,out/b --time_to_quality=t.svg   # Recall against CPU-seconds
    python report.py --catalogue=out/synthetic-gpt/best.pt    # a GPT without user context
"""
import glob
import json
import os
import types
from xml.sax.saxutils import escape

import numpy as np
import torch

from common import (TRAIN_DEFAULTS, checkpoint_data, eval_file, evaluate_ranking, load_checkpoint,
                    print_table, reference_rows)
from config import UserError, cli, configure
from data import Prompter, get_tokenizer, popularity
from decode import answer_logprobs
from encoder import DEFAULTS as DEFAULTS_ENC
from userllm import DEFAULTS as DEFAULTS_LLM
from userllm import describe, from_checkpoint

DEFAULTS = dict(
    runs="",  # out_dirs, comma-separated glob patterns
    summary=False, split="test", fig3="", curves="", time_to_quality="", metric="recall@10",
    examples=0,  # the eval.py results to read: of every user (0), or of --max_examples=examples
    catalogue="",  # a checkpoint of an LLM without user context: how well it knows the catalogue
    data_dir="", batch_size=256, device="cpu",
)


# --------------------------------------------------------------------------------------------------
# results over seeds

def read_run(run, split="test", examples=0):
    """A train_llm.py / train_encoder.py out_dir -> (its config, its model's eval row or None, its
    training log). The eval row: eval.py's results on the split, over every user (examples=0) or a
    seeded subset of that many (--max_examples)."""
    try:
        with open(os.path.join(run, "config.json")) as f:
            c = types.SimpleNamespace(**json.load(f))
        with open(os.path.join(run, "log.jsonl")) as f:
            log = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"{run}: not a training run's out_dir ({e})".splitlines()[0])
    path = os.path.join(run, eval_file(split, examples))
    if not os.path.isfile(path):
        return c, None, log
    with open(path) as f:
        return c, next(iter(json.load(f)["results"].values())), log  # first row: the run's model


def run_name(c, seed=True):
    """A run's name in tables and legends: userllm.describe for a train_llm.py run (with its
    encoder's kind when not AR, read from the encoder run's config.json), the encoder's kind (+ seen
    bias) for a train_encoder.py one; seed=False leaves the seed out."""
    if hasattr(c, "fusion"):  # DEFAULTS_LLM: keys added since the run
        name = describe(types.SimpleNamespace(**{**DEFAULTS_LLM, **vars(c),
                                                 "seed": TRAIN_DEFAULTS["seed"]}))
        enc = os.path.join(os.path.dirname(c.encoder_ckpt or "."), "config.json")
        kind = "ar"
        if c.encoder_ckpt and os.path.isfile(enc):
            try:
                with open(enc) as f:
                    kind = json.load(f).get("kind", "ar")
            except (OSError, ValueError) as e:
                raise UserError(f"{enc}: not a training run's config ({e})".splitlines()[0])
        name += f" with the {kind} encoder" if kind != "ar" else ""
    else:
        name = f"{c.kind} encoder" + (" + seen bias" if c.seen_bias else "")
    return name + (f" seed {c.seed}" if seed and c.seed != TRAIN_DEFAULTS["seed"] else "")


def signature(c):
    """A run's config without what differs between the seeds of one row (seed, paths); a key added
    since the run (absent from its config.json) has the default it ran with (a tuple default as the
    list config.json holds)."""
    defaults = DEFAULTS_LLM if hasattr(c, "fusion") else DEFAULTS_ENC
    return {k: list(v) if isinstance(v, tuple) else v for k, v in {**defaults, **vars(c)}.items()
            if k not in ("seed", "out_dir", "encoder_ckpt", "llm_ckpt", "init_from")}


def row_names(configs):
    """Each config's row name: run_name without the seed, and where configs that differ in more
    than their seed share a name (e.g. --xattn_dim=32), the keys they differ in."""
    rows = [(run_name(c, seed=False), signature(c)) for c in configs]
    names = []
    for name, mine in rows:
        diff = [k for k in mine if any(n == name and o.get(k) != mine[k] for n, o in rows)]
        names.append(name + (f" [{' '.join(f'{k}={mine[k]}' for k in diff)}]" if diff else ""))
    return names


def summarize(runs, split="test", examples=0):
    """Results over seeds: runs whose configs differ only in seed and out_dir make one row, each
    metric as mean ± sd (sample sd) over them; then, per seed, Recall@10 and tanh of the gates at
    the end of training."""
    read, pending = [], []
    for run in runs:
        c, row, log = read_run(run, split, examples)
        if row is None:
            pending.append(run)  # still training, or not evaluated yet
            continue
        last = next((r for r in reversed(log) if "loss" in r), {})
        read.append((c, row, {k: v for k, v in last.items() if k[:-1] in ("attn", "ff")}))
    groups = {}
    for name, (c, row, gates) in zip(row_names([c for c, _, _ in read]), read):
        groups.setdefault(name, []).append((c.seed, row, gates))
    if pending:
        print(f"skipped {len(pending)} runs without {eval_file(split, examples)} (eval.py "
              "--ckpt=<run>/best.pt): " + ", ".join(pending))
    if not groups:
        raise UserError("report.py: --summary found no evaluated run")
    metrics = list(dict.fromkeys(m for rs in groups.values() for _, r, _ in rs for m in r))
    width = max(map(len, groups)) + 2
    print(f"{split} split, mean ± sd over seeds".ljust(width) + "seeds"
          + "".join(f"{m:>18s}" for m in metrics))
    for name, rs in groups.items():
        cells = [np.array([r[m] for _, r, _ in rs if m in r]) for m in metrics]
        print(f"{name:{width}s}{len(rs):5d}" + "".join(
            f"{v.mean():11.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}" if len(v) else " " * 18
            for v in cells))
    key = "recall@10" if "recall@10" in metrics else metrics[0]
    print(f"per seed: {key}, and tanh of each cross-attention gate at the end of training (the "
          "block's attention, FFW)")
    for name, rs in groups.items():
        for seed, r, g in sorted(rs, key=lambda x: x[0]):
            gates = " ".join(f"{k} {v:+.2f}" for k, v in g.items())
            print(f"  {name} seed {seed}: {r.get(key, float('nan')):.4f}  {gates}")
    return groups


# --------------------------------------------------------------------------------------------------
# plots

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def ticks(lo, hi, log=False):
    """Round tick values in [lo, hi]: about 5 steps of 1, 2 or 5 x 10^k; on a log axis 1, 2, 3, 5 x
    each power of 10."""
    if log:
        powers = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
        return [m * 10.0 ** k for k in powers for m in (1, 2, 3, 5) if lo <= m * 10.0 ** k <= hi]
    step = 10.0 ** np.floor(np.log10((hi - lo) / 5 or 1))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= 5)
    return list(np.arange(np.ceil(lo / step) * step, hi + step * 1e-6, step))


def svg_chart(path, series, title, xlabel, ylabel, log_y=False):
    """A line chart in an SVG file: series = {label: (xs, ys)}, one coloured line each."""
    write_svg(path, [chart(series, title, xlabel, ylabel, log_y)])


def write_svg(path, panels):
    """Charts side by side in one SVG file, each a <g id="panelI"> (I from 0, left to right)."""
    W, H = sum(w for w, _, _ in panels), max(h for _, h, _ in panels)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>']
    x = 0
    for i, (w, _, body) in enumerate(panels):
        out += [f'<g id="panel{i}" transform="translate({x},0)">', *body, "</g>"]
        x += w
    with open(path, "w") as fh:
        fh.write("\n".join(out + ["</svg>"]) + "\n")


def chart(series, title, xlabel, ylabel, log_y=False, colors=None, legend=True):
    """One chart's width, height and SVG elements: series = {label: (xs, ys)}, one coloured line
    each (colors: {label: colour}, else in turn; with dots when it has few points), the legend on
    the right unless legend=False."""
    right = 60 + 7 * max(len(label) for label in series) if legend else 30  # holds the legend
    W, H, left, top, bottom = 500 + right, 420, 70, 40, 50
    f = (lambda y: np.log10(max(y, 1e-9))) if log_y else (lambda y: y)
    title, xlabel, ylabel = escape(title), escape(xlabel), escape(ylabel)
    xs = [x for xv, _ in series.values() for x in xv]
    ys = [f(y) for _, yv in series.values() for y in yv]
    x0, x1 = min(xs), max(xs)
    y0, y1 = (min(ys), max(ys)) if log_y else (min(0.0, min(ys)), max(ys) * 1.05)
    px = lambda x: left + (x - x0) / ((x1 - x0) or 1) * (W - left - right)
    py = lambda y: H - bottom - (f(y) - y0) / ((y1 - y0) or 1) * (H - top - bottom)
    mid_x, mid_y = (W - right + left) / 2, (H - bottom + top) / 2
    out = [f'<text x="{mid_x}" y="22" text-anchor="middle" font-size="14">{title}</text>',
           f'<text x="{mid_x}" y="{H - 12}" text-anchor="middle">{xlabel}</text>',
           f'<text x="16" y="{mid_y}" text-anchor="middle" transform="rotate(-90 16 {mid_y})">'
           f'{ylabel}</text>',
           f'<path d="M{left},{top} V{H - bottom} H{W - right}" stroke="black" fill="none"/>']
    for t in ticks(10 ** y0, 10 ** y1, log_y) if log_y else ticks(y0, y1):  # y ticks, grid lines
        out.append(f'<path d="M{left},{py(t):.1f} H{W - right}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    for x in sorted(set(xs)) if len(set(xs)) <= 12 else ticks(x0, x1):  # the points, or round ones
        out.append(f'<text x="{px(x):.1f}" y="{H - bottom + 18}" '
                   f'text-anchor="middle">{x:.4g}</text>')
    for i, (label, (xv, yv)) in enumerate(series.items()):
        c = (colors or {}).get(label, COLORS[i % len(COLORS)])
        label = escape(label)
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xv, yv))
        out.append(f'<polyline points="{points}" fill="none" stroke="{c}" stroke-width="2">'
                   f'<title>{label}</title></polyline>')
        if len(xv) <= 12:
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{c}"/>'
                    for x, y in zip(xv, yv)]
        ly = top + 10 + 20 * i
        if legend:
            out.append(f'<path d="M{W - right + 15},{ly} h24" stroke="{c}" stroke-width="2"/>'
                       f'<text x="{W - right + 45}" y="{ly + 4}">{label}</text>')
    return W, H, out


def plot_fig3(runs, path, metric="recall@10", split="test", examples=0):
    """Paper Fig. 3: a metric against the history length N, one line per method, each point the
    mean over the seeds given. A User-LLM run's N is its seq_len (the events the encoder sees); a
    TextPrompt run's is its text_events (the events written into the prompt). A second panel
    draws the training cost against N (log scale), and a table gives per method and N the seeds,
    the metric's mean ± sd and the cost: CPU-ms per training example (log.jsonl's cpu_s at the
    last training step, validation not counted, over steps x batch_size x grad_accum), mean over
    the seeds."""
    points = {}  # (method, N) -> [(value, cost)], one per run
    for run in runs:
        c, row, log = read_run(run, split, examples)
        if row is None:
            raise UserError(f"{run}: no {eval_file(split, examples)}; run eval.py "
                            f"--ckpt={run}/best.pt first")
        if metric not in row:
            raise UserError(f"{run}: no '{metric}' in its results (it has {', '.join(row)})")
        if not hasattr(c, "fusion"):
            raise UserError(f"{run}: Fig. 3 plots train_llm.py runs, this is an encoder's")
        text_only = c.fusion == "none"
        name = "TextPrompt" if text_only else run_name(c, seed=False).replace(f" N={c.seq_len}", "")
        last = next((r for r in reversed(log) if "loss" in r and "cpu_s" in r), None)
        cost = (1e3 * last["cpu_s"] / (last["step"] * c.batch_size * c.grad_accum)
                if last and last["step"] else None)
        points.setdefault((name, c.text_events if text_only else c.seq_len), []).append(
            (row[metric], cost))
    table = []
    for (name, n), got in sorted(points.items()):
        v = np.array([value for value, _ in got])
        costs = [cost for _, cost in got if cost is not None]
        table.append(dict(method=name, N=n, seeds=len(v), value=v.mean(),
                          sd=v.std(ddof=1) if len(v) > 1 else None,
                          cost=float(np.mean(costs)) if costs else None))
    print_table(table, columns=[("method", "method", ""), ("N", "N", ""), ("seeds", "seeds", ""),
                                (metric, "value", ".4f"), ("sd", "sd", ".4f"),
                                ("train CPU-ms/example", "cost", ".2f")])

    def lines(key):  # {method: (Ns, values of key)}, the N that have one
        pts = {}
        for r in table:
            if r[key] is not None:
                pts.setdefault(r["method"], []).append((r["N"], r[key]))
        return {name: tuple(zip(*p)) for name, p in pts.items()}

    series, costs = lines("value"), lines("cost")
    panels = [chart(series, f"{metric} against history length ({split} split), mean over seeds",
                    "events of history N", metric)]
    colors = {name: COLORS[i % len(COLORS)] for i, name in enumerate(series)}  # one per method
    if costs:  # beside it, what a training example cost at each N (the same colours, no legend)
        panels.append(chart(costs, "training cost per example, mean over seeds",
                            "events of history N",
                            "CPU-ms per training example (log scale)", log_y=True, colors=colors,
                            legend=False))
    write_svg(path, panels)
    return series, table


def plot_curves(runs, path):
    """Training loss against step, one line per run (from each out_dir's log.jsonl)."""
    series = {}
    for run in runs:
        c, _, log = read_run(run)
        pts = [(r["step"], r["loss"]) for r in log if "loss" in r]
        if not pts:
            raise UserError(f"{run}: its log.jsonl has no training loss yet")
        name = run_name(c)
        series[name if name not in series else f"{name} [{run}]"] = tuple(zip(*pts))
    svg_chart(path, series, "training loss", "step", "loss (log scale)", log_y=True)
    return series


def plot_time_to_quality(runs, path, metric="recall@10"):
    """Validation metric against training CPU-seconds (validation not counted), one line per run,
    from the validation rows of each out_dir's log.jsonl (they carry cpu_s): the quality a run
    reaches for the CPU time it spends."""
    series = {}
    for run in runs:
        c, _, log = read_run(run)
        key = f"val_{metric}"
        pts = [(r["cpu_s"], r[key]) for r in log if key in r and "cpu_s" in r]
        if not pts:
            raise UserError(f"{run}: its log.jsonl has no validation {metric} with cpu_s")
        name = run_name(c)
        series[name if name not in series else f"{name} [{run}]"] = tuple(zip(*pts))
    svg_chart(path, series, f"validation {metric} against training time", "training CPU-seconds",
              f"validation {metric}")
    return series


# --------------------------------------------------------------------------------------------------
# does a stand-in LLM know its catalogue?

def average_ranks(x):
    """Ranks 0..n-1 of x, ties sharing their average rank (as Spearman's correlation needs)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts  # the first rank of each distinct value
    return (start + (counts - 1) / 2)[inverse]


@torch.no_grad()
def catalogue(cfg):
    """How well an LLM without user context (next item, no history text) knows the catalogue. Its
    prompt is the same for every user, so its ranking is one list, and a pretrained LLM should rank
    as most popular does. Prints the probability its titles hold after the query (the rest goes to
    strings that are no title), the Spearman correlation of their log-probabilities with the
    training counts, how many of its top 10 are among the 10 most watched, and that one list's
    Recall@k on every target of --split beside most popular's: exact, from one forward pass
    (--split=train: the share of the training targets its top k covers; most popular's is the most
    any one list can cover)."""
    ckpt = load_checkpoint(cfg.catalogue)
    c = ckpt["config"]
    plain = c.get("task") == "next_item" and c.get("fusion") == "none" and not c.get("text_events")
    if "llm_config" not in ckpt or not plain:
        raise UserError(f"report.py: --catalogue needs an LLM trained without user context on the "
                        f"next item (task next_item, fusion none, text_events 0); {cfg.catalogue} "
                        "is not one")
    d = checkpoint_data(ckpt, cfg.catalogue, cfg.data_dir)
    tok = get_tokenizer(c["llm"])
    tcfg, model = from_checkpoint(ckpt, cfg.catalogue, d, tok, cfg.device)
    prompter = Prompter(d, tok, tcfg.task, 0, tcfg.max_text_tokens, tcfg.max_answer_tokens)
    prompt = prompter.prompts(d.targets("train")[:1])  # everyone's
    idx = torch.tensor(prompt, device=cfg.device)  # (1, P)
    logp = answer_logprobs(model.llm, idx, {}, prompter.answers[1:])[0].cpu().numpy()  # (C,) 1..C
    counts = popularity(d)[1:]
    top = lambda x: set(np.argsort(-x, kind="stable")[:10].tolist())
    targets = d.targets(cfg.split)
    scores = torch.from_numpy(np.r_[-np.inf, logp].astype(np.float32)).to(cfg.device)  # (V,)
    rows = {"its one list": evaluate_ranking(lambda h: scores.expand(len(h[0]), -1), d, targets,
                                             tcfg.seq_len, "item", cfg.batch_size, cfg.device)}
    rows.update(reference_rows(d, cfg.split, targets, tcfg.seq_len, "item", cfg.batch_size,
                               cfg.device))
    fit = {"catalogue mass": float(np.exp(logp.astype(np.float64)).sum()),
           "spearman vs counts": float(np.corrcoef(average_ranks(logp),
                                                   average_ranks(counts))[0, 1]),
           "top-10 overlap": len(top(logp) & top(counts)), "examples": len(targets), "rows": rows}
    print(f"{cfg.catalogue}: its titles hold {fit['catalogue mass']:.3f} of the probability after "
          f"the query; Spearman {fit['spearman vs counts']:.3f} against the training counts; "
          f"{fit['top-10 overlap']} of its top 10 are among the 10 most watched; on all "
          f"{fit['examples']} targets of the {cfg.split} split:")
    print_table(rows)
    return fit


def main(argv):
    cfg = configure(DEFAULTS, argv, __doc__)
    if cfg.catalogue:
        return catalogue(cfg)
    patterns = [r for r in cfg.runs.split(",") if r]
    if cfg.summary:
        runs = sorted(r for p in patterns for r in glob.glob(p))
    else:  # each pattern's matches in order; one that matches nothing stays, and fails when read
        runs = [r for p in patterns for r in (sorted(glob.glob(p)) or [p])]
    if not runs:
        raise UserError(f"report.py: no run matches --runs='{cfg.runs}'")
    if cfg.summary:
        return summarize(runs, cfg.split, cfg.examples)
    fig3 = lambda p: plot_fig3(runs, p, cfg.metric, cfg.split, cfg.examples)
    for path, plot in ((cfg.fig3, fig3),
                       (cfg.curves, lambda p: plot_curves(runs, p)),
                       (cfg.time_to_quality, lambda p: plot_time_to_quality(runs, p, cfg.metric))):
        if path:
            plot(path)
            print(f"wrote {path}")


if __name__ == "__main__":
    cli(main)

"""
Plumbing shared by train_encoder.py and train_llm.py (and data.py / eval.py for the config): written once, here.

- configure(): plain-Python config files + --key=value overrides, with unknown keys as errors (nanoGPT's configurator,
  minus its silent typos).
- setup_distributed(): torchrun-aware device / process-group setup (NCCL on GPU, gloo on CPU) and mixed precision.
- get_lr(): linear warmup + cosine decay (paper App. C).
- save_checkpoint() / load_checkpoint(): atomic writes, weights_only loads; check_data(): a checkpoint is used only
  with the dataset it was trained on (data.UserData.fingerprint).
- ranking_metrics() / evaluate_ranking() / evaluate_loss(): the validation both loops (and eval.py) run.
- train(): the hand-written training loop both scripts run, in the familiar order:
  set LR -> evaluate/checkpoint -> micro-steps (grad sync on the last) -> unscale, clip -> step -> zero grads -> log.
"""
import ast
import contextlib
import difflib
import json
import math
import os
import pickle
import time
import types
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


# ----------------------------------------------------------------------------------------------------------------------
# configuration

def _coerce(key, value, default):
    """Type-check an override against its default: int->float is fine, None is fine, anything else must match."""
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise SystemExit(f"config: '{key}' expects True/False, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return tuple(value)
    if isinstance(default, str) and not isinstance(value, str):
        return str(value)  # e.g. --out_dir=2024 parses as an int
    if type(value) is not type(default):
        raise SystemExit(f"config: '{key}' expects {type(default).__name__}, got {value!r}")
    return value


def _unknown(key, known, where):
    hint = difflib.get_close_matches(key, known, n=1)
    raise SystemExit(f"config: unknown key '{key}' in {where}" + (f" (did you mean '{hint[0]}'?)" if hint else ""))


def usage(defaults, doc):
    """What --help prints: the script's docstring, then every key with its default."""
    width = max(map(len, defaults)) + 2
    keys = "\n".join(f"  --{k:<{width}s} {v!r}" for k, v in defaults.items())
    return f"{(doc or '').strip()}\n\nusage: [config.py] [--key=value ...]; keys and defaults:\n{keys}"


def run_config_file(path):
    """Execute a plain-Python config file; an error in it is one line naming the file and line."""
    if not os.path.isfile(path):
        raise SystemExit(f"config: no such config file: {path}")
    scope = {}
    with open(path) as f:
        text = f.read()
    try:
        exec(compile(text, path, "exec"), scope)  # config files are plain Python we trust like the scripts
    except SyntaxError as e:
        raise SystemExit(f"config: {path}:{e.lineno}: {e.msg}")
    except Exception as e:  # e.g. a NameError: the line is the innermost frame that ran the file
        tb = e.__traceback__
        while tb.tb_next is not None and tb.tb_next.tb_frame.f_code.co_filename == path:
            tb = tb.tb_next
        line = tb.tb_lineno if tb.tb_frame.f_code.co_filename == path else "?"
        raise SystemExit(f"config: {path}:{line}: {type(e).__name__}: {e}")
    return scope


def configure(defaults, argv, doc=None):
    """defaults: dict of every key a script accepts. argv: [config.py] [--key=value ...] (or --help / -h: print the
    script's doc and its keys, exit). Returns a namespace."""
    cfg, args = dict(defaults), list(argv)
    if "--help" in args or "-h" in args:
        print(usage(defaults, doc))
        raise SystemExit(0)
    if args and not args[0].startswith("--"):
        path = args.pop(0)
        for key, value in run_config_file(path).items():
            if key.startswith("_") or isinstance(value, types.ModuleType):
                continue
            if key not in cfg:
                _unknown(key, cfg, path)
            cfg[key] = _coerce(key, value, defaults[key])
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"config: expected --key=value, got '{arg}'")
        key, text = arg[2:].split("=", 1)
        if key not in cfg:
            _unknown(key, cfg, "the command line")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string such as --dataset=ml20m
        cfg[key] = _coerce(key, value, defaults[key])
    return types.SimpleNamespace(**cfg)


def save_config(cfg, path):
    with open(path, "w") as f:
        json.dump(vars(cfg), f, indent=2)


# ----------------------------------------------------------------------------------------------------------------------
# distributed setup and precision

@dataclass
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype  # the autocast dtype (float32 = no autocast)

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def setup_distributed(device="auto", dtype="auto", seed=1337):
    """One call for: torchrun process group, device, autocast dtype, seeds. Single process when not under torchrun."""
    env = (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1))  # set by torchrun
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in env)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if device == "cuda" and world > 1 else device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    # auto: bf16 on a GPU that has it, else fp16. On the CPU fp32, because whether bf16 autocast pays off there depends
    # on the model's size, which is not known here. `python flops.py --bench_dtype=True` (forward + backward, a CPU with
    # AVX512-BF16, no AMX, 1-2 threads): GPT-2 small 1.6-1.9x faster in bf16, the demo's encoder and GPT 0.98-1.17x
    # (noise). So --dtype=bfloat16 pays off for GPT-2-sized models on a CPU with native bf16 (torch.cpu.
    # get_capabilities(): avx512_bf16 or amx_bf16); fp32 keeps the demo's numbers (README) as they were produced.
    if dtype == "auto":
        dtype = "float32" if device.type != "cuda" else ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"config: dtype must be auto, float32, bfloat16 or float16, got '{dtype}'")
    torch.manual_seed(seed)  # the same seed on every rank: identical initial weights (training draws: seed_all)
    return Context(rank, local_rank, world, device, getattr(torch, dtype))


def all_reduce_sum(values, ctx):
    """Sum a list of floats over all ranks (evaluation metrics, logged losses)."""
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def to_device(batch, device):
    """A batch dict of data.py (numpy arrays or tensors, or tuples of them: one per feature) as tensors on device."""
    def move(x):
        if isinstance(x, tuple):
            return tuple(move(t) for t in x)
        return (torch.from_numpy(x) if isinstance(x, np.ndarray) else x).to(device, non_blocking=True)
    return {k: move(v) for k, v in batch.items()}


def shard_batches(targets, batch_size, ctx=None):
    """This rank's evaluation batches: the batches one process would make, dealt round-robin to the ranks, so that
    every batch (and so every reported number) is the same whatever the world size."""
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    return [(i // batch_size, targets[i:i + batch_size])
            for i in range(rank * batch_size, len(targets), world * batch_size)]


def seeded_subset(targets, n, seed):
    """At most n examples of a split, the same seeded choice every time (n=0: all of them)."""
    if n and len(targets) > n:
        targets = np.sort(np.random.default_rng(seed).choice(targets, n, replace=False))
    return targets


@torch.no_grad()
def evaluate_loss(model, make_batch, targets, ctx, batch_size=64):
    """Mean answer-token loss of a UserLLM over `targets` (all ranks pass the same; each evaluates its batches)."""
    total, n = 0.0, 0
    for _, ids in shard_batches(targets, batch_size, ctx):
        total += model(make_batch(ids)).item() * len(ids)
        n += len(ids)
    total, n = all_reduce_sum([total, n], ctx)
    return {"loss": total / max(n, 1)}


def ranking_metrics(scores, target, ks=(1, 5, 10)):
    """scores (B, V) over all candidates, target (B,) ids. Returns mean Recall@k for each k and NDCG@10. Ties count
    against the target (its rank is 1 + the number of other candidates scoring >= it): a constant scorer gets no
    credit."""
    s = scores.float()
    t = s.gather(1, target[:, None])  # (B, 1) the target's score
    rank = (s > t).sum(1) + (s == t).sum(1) - 1  # 0-based; ties against the target
    out = {f"recall@{k}": (rank < k).float().mean().item() for k in ks}
    gain = torch.where(rank < 10, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros_like(s[:, 0]))  # (B,)
    out["ndcg@10"] = gain.mean().item()
    return out


@torch.no_grad()
def evaluate_ranking(score_fn, d, targets, seq_len, label="item", batch_size=256, device="cpu", loss_fn=None, ctx=None,
                     seed=0):
    """Mean ranking metrics of score_fn(hist) -> (B, V) over the examples `targets` (label 'item' or 'fav'), plus the
    mean loss_fn(batch) if given (its random draws, Bert4Rec's masks, seeded by (seed, batch)). With a distributed
    ctx, all ranks pass the same targets, each evaluates its share of the batches, and all get the global means (the
    same numbers as one process)."""
    sums, n = {}, 0
    for b, ids in shard_batches(targets, batch_size, ctx):
        batch = to_device(d.batch(ids, seq_len), device)
        y = batch["target"][0] if label == "item" else batch["fav"]
        metrics = ranking_metrics(score_fn(batch["hist"]), y)
        if loss_fn is not None:
            seed_all(seed, 1, b)
            metrics["loss"] = loss_fn(batch).item()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * len(y)
        n += len(y)
    if ctx is not None:  # every rank must hold the same keys, even one whose shard was empty
        keys = [f"recall@{k}" for k in (1, 5, 10)] + ["ndcg@10"] + (["loss"] if loss_fn is not None else [])
        *values, n = all_reduce_sum([sums.get(k, 0.0) for k in keys] + [n], ctx)
        sums = dict(zip(keys, values))
    return {k: v / max(n, 1) for k, v in sums.items()}


def cleanup_distributed(ctx):
    if ctx.world_size > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------------
# learning-rate schedule and checkpoints

def get_lr(step, lr, warmup_steps, decay_steps, min_lr):
    """Linear warmup to lr, then cosine decay to min_lr at decay_steps, then flat."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def save_checkpoint(obj, path):
    """Write to a temporary file, fsync, then rename: a kill mid-save never leaves a corrupt checkpoint (and a
    killed save's temporary file is removed by remove_stale_temporaries when the next run starts)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_stale_temporaries(out_dir):
    """Delete the temporary files of saves that were killed before their rename (a run owns its out_dir)."""
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else ():
        stem, _, pid = name.rpartition(".tmp")
        if stem.endswith(".pt") and pid.isdigit():
            os.remove(os.path.join(out_dir, name))


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)  # data, not code: never unpickle
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # it names classes or functions: only full unpickling could build them
            raise SystemExit(f"{path} is not a plain weights checkpoint and was not loaded: loading it could run code")
        raise SystemExit(f"cannot read checkpoint {path}: not a checkpoint, or a damaged one")
    except Exception as e:  # a truncated or foreign file: one line, no traceback
        raise SystemExit(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0])


def check_data(stored, current, source):
    """Refuse to use a checkpoint (source) with data other than it was trained on: fingerprints from
    data.UserData.fingerprint(), compared on vocabularies, sizes and the checksum of the prepared arrays."""
    if stored is None:
        print(f"warning: {source} carries no dataset fingerprint (an older checkpoint): its data is not checked")
        return
    keys = ("vocab_sizes", "n_users", "n_events", "sha256")
    if any(stored[k] != current[k] for k in keys):
        show = lambda fp: f"{fp['path']} ({fp['n_users']:,} users, {fp['n_events']:,} events, vocabularies " \
                          f"{'/'.join(map(str, fp['vocab_sizes']))}, sha256 {fp['sha256']})"
        raise SystemExit(f"{source} was trained on {show(stored)}, not on {show(current)}: refusing the mismatch")


def data_path(stored, override, source):
    """The prepared folder a checkpoint was trained on (absolute), or --data_dir=override; one line when missing."""
    path = override or (stored or {}).get("path", "")
    if not os.path.isfile(os.path.join(path, "meta.json")):
        where = f"--data_dir={override}" if override else f"its dataset {path or '(unrecorded)'}"
        raise SystemExit(f"{source}: {where} holds no prepared dataset; prepare it with data.py, or point "
                         f"--data_dir= at the prepared folder")
    return path


def load_weights(model, state, path, strict=True):
    """model.load_state_dict(state, strict), with a checkpoint that does not fit the model reported in one line."""
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise SystemExit(f"{path} does not fit this model: {str(e).splitlines()[1].strip()[:300]}")


def adamw(model, lr, weight_decay, betas=(0.9, 0.95), lr_mult=None):
    """AdamW with decoupled weight decay on matrices only (not on biases, LayerNorms, gates). lr_mult: {name part:
    multiplier} gives the parameters whose name contains it their own learning rate, lr_mult x the schedule's."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            mult = next((m for part, m in (lr_mult or {}).items() if part in name), 1.0)
            decay = weight_decay if p.dim() >= 2 else 0.0
            groups.setdefault((decay, mult), []).append(p)
    return torch.optim.AdamW([{"params": ps, "weight_decay": wd, "lr_mult": m} for (wd, m), ps in groups.items()],
                             lr=lr, betas=betas, foreach=False)  # foreach=False: bit-identical resume on CPU


# ----------------------------------------------------------------------------------------------------------------------
# the training loop

TRAIN_DEFAULTS = dict(
    out_dir="out", init_from="scratch",  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    max_steps=1000, lr_decay_steps=0,  # 0: decay over max_steps (set both to stop early and resume on the same curve)
    batch_size=64, grad_accum=1,  # batch_size: examples per optimizer step, split into grad_accum micro-batches
    lr=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.1, beta2=0.95, grad_clip=1.0,
    eval_interval=200, eval_examples=2000, log_interval=20, seed=1337,
    device="auto", dtype="auto", compile=False,
)


def micro_batch_targets(global_targets, ctx, grad_accum):
    """This rank's micro-batches of the global batch at `step`, as (chunk index, example ids). The global batch is
    split into grad_accum equal chunks whatever the world size, and rank r takes chunks r, r + W, ...: so W processes
    compute exactly what 1 process does."""
    if grad_accum % ctx.world_size or len(global_targets) % grad_accum:
        raise SystemExit(f"config: grad_accum={grad_accum} must be a multiple of the world size {ctx.world_size} and "
                         f"divide batch_size={len(global_targets)}")
    chunks = global_targets.reshape(grad_accum, -1)
    return [(c, chunks[c]) for c in range(ctx.rank, grad_accum, ctx.world_size)]


def seed_all(*key):
    """Seed torch's generators (CPU and every GPU) from a key of non-negative ints: every random draw of a training
    micro-batch (dropout, Bert4Rec's masks) is a function of (seed, step, chunk), and of a validation batch of
    (seed, batch), so any world size and any resume point compute the same numbers."""
    torch.manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]))


def check_train_config(cfg):
    """What can be checked before any work or any write to out_dir: the scripts call it first, train() again."""
    if cfg.init_from not in ("scratch", "resume"):
        raise SystemExit(f"config: init_from must be 'scratch' or 'resume', got '{cfg.init_from}'")
    if cfg.init_from == "resume" and not os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt")):
        raise SystemExit(f"config: init_from='resume' but {os.path.join(cfg.out_dir, 'ckpt.pt')} does not exist")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise SystemExit(f"config: dtype must be auto, float32, bfloat16 or float16, got '{cfg.dtype}'")
    if cfg.batch_size % cfg.grad_accum:
        raise SystemExit(f"config: grad_accum={cfg.grad_accum} must divide batch_size={cfg.batch_size}")


@dataclass
class Selection:
    """The validation metric that picks best.pt, and which way is better (recall: higher; loss: lower)."""
    metric: str
    higher_is_better: bool = True

    def improved(self, value, best):
        return best is None or (value > best if self.higher_is_better else value < best)


class RunLog:
    """out_dir/log.jsonl (one JSON object per line: training rows {step, loss, lr, units_per_s}, validation rows
    {step, val_*}) and the progress bar, on the master process only. Opening it for a run keeps the lines up to the
    step the run starts from (a resume recomputes the rest; a fresh run keeps none), so no step is logged twice."""

    def __init__(self, cfg, ctx, start_step, resumed):
        from tqdm import tqdm
        self.master, self.path = ctx.master, os.path.join(cfg.out_dir, "log.jsonl")
        self.bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not ctx.master, dynamic_ncols=True)
        self.t0, self.t0_step = time.time(), start_step
        if self.master:
            rows = []
            if resumed and os.path.isfile(self.path):
                with open(self.path) as f:
                    rows = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
            self.file = open(self.path, "w")
            self.file.writelines(rows)

    def validation(self, step, metrics, cpu_s):
        if self.master:
            self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            row = {"step": step, **{f"val_{k}": v for k, v in metrics.items()}, "cpu_s": cpu_s}
            self.write(row)  # flushed: never lost to a kill

    def training(self, step, loss, lr, examples_per_step, cpu_s, watch):
        """A training row every log_interval steps: loss, lr, throughput since the last row, training CPU-seconds so
        far and the watched values (User-LLM: tanh of each gate), which the progress bar shows too."""
        if self.master:
            rate = (step - self.t0_step) * examples_per_step / max(time.time() - self.t0, 1e-9)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **{k: f"{v:+.2f}" for k, v in watch.items()})
            self.write({"step": step, "loss": loss, "lr": lr, "units_per_s": rate, "cpu_s": cpu_s, **watch})
            self.t0, self.t0_step = time.time(), step

    def write(self, row):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self):
        self.bar.close()
        if self.master:
            self.file.close()


@dataclass
class Run:
    """What a training run carries from step to step, and what a checkpoint stores of it."""
    cfg: types.SimpleNamespace
    ctx: Context
    model: torch.nn.Module  # the plain model (not compiled, not DDP-wrapped): its parameter names go in checkpoints
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    extra: dict  # stored beside the weights: model config, dataset fingerprint, ...
    step: int = 0
    best: float = None  # the best validation value of the selection metric so far
    metrics: dict = None  # the latest validation metrics
    cpu_s: float = 0.0  # CPU-seconds spent in training steps so far (all threads; validation not counted)

    def save(self, path):
        save_checkpoint({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scaler": self.scaler.state_dict(), "step": self.step, "best": self.best,
                         "metrics": self.metrics, "cpu_s": self.cpu_s, "config": vars(self.cfg),
                         **self.extra}, path)

    def restore(self, path):
        """Continue from a checkpoint of this run (weights, optimizer, scaler, step), trained on this data. No RNG state:
        every random draw is seeded by (seed, step, chunk) (seed_all)."""
        ckpt = load_checkpoint(path, map_location=self.ctx.device)
        if "data" in self.extra:
            check_data(ckpt.get("data"), self.extra["data"], path)
        load_weights(self.model, ckpt["model"], path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # another split of the parameters into groups: another strategy, lr multipliers
            raise SystemExit(f"{path}: its optimizer state does not fit this run's trained parameters (another "
                             f"strategy or learning-rate multiplier, or an older version?): {e}")
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.best, self.metrics = ckpt["step"], ckpt["best"], ckpt["metrics"]
        self.cpu_s = ckpt.get("cpu_s", 0.0)


def start(cfg, ctx, model, optimizer, extra):
    """A Run from scratch or, with init_from='resume', from out_dir/ckpt.pt; out_dir made ready (stale temporaries
    removed, config.json written) only once everything has been checked."""
    check_train_config(cfg)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.dtype == torch.float16)
    run = Run(cfg, ctx, model, optimizer, scaler, extra, metrics={})
    if cfg.init_from == "resume":
        run.restore(os.path.join(cfg.out_dir, "ckpt.pt"))
        if ctx.master:
            print(f"resumed from {cfg.out_dir}/ckpt.pt at step {run.step} (best so far {run.best:.4f})")
    if ctx.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        remove_stale_temporaries(cfg.out_dir)
        save_config(cfg, os.path.join(cfg.out_dir, "config.json"))
    return run


def validate(run, evaluate, select, log):
    """Evaluate on the validation split (every rank), log it, save ckpt.pt and, when it improved, best.pt."""
    run.model.eval()
    with torch.no_grad(), run.ctx.autocast():
        run.metrics = evaluate(run.model)
    run.model.train()
    improved = select.improved(run.metrics[select.metric], run.best)
    run.best = run.metrics[select.metric] if improved else run.best
    log.validation(run.step, run.metrics, run.cpu_s)
    if run.ctx.master:
        run.save(os.path.join(run.cfg.out_dir, "ckpt.pt"))
        if improved:
            run.save(os.path.join(run.cfg.out_dir, "best.pt"))


def accumulate_gradients(model, micro, make_batch, run):
    """Forward + backward over this rank's micro-batches of the step; returns the global-batch mean loss."""
    loss_sum = 0.0
    for i, (chunk, ids) in enumerate(micro):
        batch = make_batch(ids)
        seed_all(run.cfg.seed, 0, run.step, chunk)
        sync = i == len(micro) - 1  # DDP all-reduces gradients only on the last micro-step
        with (contextlib.nullcontext() if sync or run.ctx.world_size == 1 else model.no_sync()), run.ctx.autocast():
            loss = model(batch) / len(micro)  # the mean over this rank's micro-batches; DDP then averages the ranks
        run.scaler.scale(loss).backward()
        loss_sum += loss.item()
    return all_reduce_sum([loss_sum], run.ctx)[0] / run.ctx.world_size


def stop_if_not_finite(loss, run, log):
    """A NaN/inf loss stops the run before the bad update, keeping the last good checkpoint."""
    if not math.isfinite(loss):
        log.close()
        if run.ctx.master:
            print(f"loss is {loss} at step {run.step}: stopping. The last good checkpoint is "
                  f"{run.cfg.out_dir}/ckpt.pt (try a lower lr, or dtype=float32)")
        cleanup_distributed(run.ctx)
        raise SystemExit(1)


def clip_and_step(run):
    if run.cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def train(cfg, ctx, model, optimizer, global_batch, make_batch, evaluate, select, extra, units_per_example=1,
          watch=dict):
    """The training loop. model(batch) -> loss. global_batch(step) -> the step's example ids (identical on all ranks);
    make_batch(ids) -> a batch on ctx.device; evaluate(model) -> dict of validation metrics (all ranks take part);
    select: a Selection, the metric that picks best.pt; extra: what checkpoints store beside the weights;
    watch() -> a dict of numbers logged with each training row and shown in the progress bar.
    Returns the last validation metrics."""
    run = start(cfg, ctx, model, optimizer, extra)
    log = RunLog(cfg, ctx, run.step, resumed=cfg.init_from == "resume")
    validated = run.step if cfg.init_from == "resume" else -1  # that step's validation is in the checkpoint already
    if cfg.compile:
        model = torch.compile(model)  # run.model keeps the plain parameter names for checkpoints
    if ctx.world_size > 1:
        model = DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    while True:
        lr = get_lr(run.step, cfg.lr, cfg.warmup_steps, cfg.lr_decay_steps or cfg.max_steps, cfg.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        if (run.step % cfg.eval_interval == 0 or run.step == cfg.max_steps) and run.step != validated:
            validate(run, evaluate, select, log)
        if run.step == cfg.max_steps:
            break
        cpu0 = time.process_time()
        micro = micro_batch_targets(global_batch(run.step), ctx, cfg.grad_accum)
        loss = accumulate_gradients(model, micro, make_batch, run)
        stop_if_not_finite(loss, run, log)
        clip_and_step(run)
        run.step, run.cpu_s = run.step + 1, run.cpu_s + time.process_time() - cpu0
        log.bar.update(1)
        if run.step % cfg.log_interval == 0 or run.step == cfg.max_steps:
            log.training(run.step, loss, lr, cfg.batch_size * units_per_example, run.cpu_s, watch())
    log.close()
    if ctx.master:
        print(f"done: best validation {select.metric} {run.best:.4f}; checkpoints {cfg.out_dir}/best.pt (best), "
              f"{cfg.out_dir}/ckpt.pt (last)")
    return run.metrics

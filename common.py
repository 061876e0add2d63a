"""
Plumbing both training scripts need (paper App. C's optimisation; everything else is engineering),
written once:

- setup(): torchrun-aware process group (NCCL on GPU, gloo on CPU), device, autocast dtype, seeds;
  seed_all().
- micro_batches() / shard_batches(): a step's global batch and an evaluation's batches, the same
  whatever the world size.
- get_lr() / adamw(): linear warmup + cosine decay; AdamW with weight decay on matrices only.
- Run: a run's state between steps and on disk (ckpt.pt, best.pt, log.jsonl, config.json), from
  scratch or resumed.
- checkpoints: atomic writes, weights_only loads, a dataset fingerprint check.
- ranking_metrics() / evaluate_ranking() / evaluate_loss(): the validation both loops run (and
  eval.py).
- measuring: print_table, FLOP counting on CPU, step timing, MFU (flops.py and bench.py).

The training loop itself is in each script (train_encoder.py, train_llm.py), top to bottom as in
nanoGPT.
"""
import contextlib
import hashlib
import json
import math
import os
import pickle
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config import UserError, at_least, fraction, one_of
from data import UserData, popularity
from sources import oracle_recall

# the keys every training script has (their model's keys: encoder.py, userllm.py)
TRAIN_DEFAULTS = dict(
    out_dir="out", init_from="scratch",  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    max_steps=1000, lr_decay_steps=0,  # 0: decay over max_steps (set both to stop early, resume)
    batch_size=64, grad_accum=1,  # examples per optimizer step, split into grad_accum micro-batches
    lr=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.1, beta2=0.95, grad_clip=1.0,
    eval_interval=200, eval_examples=2000, log_interval=20, seed=1337,
    device="auto", dtype="auto", compile=False,
)


DEVICES = ("auto", "cpu", "cuda", "mps") + tuple(f"cuda:{i}" for i in range(16))
TRAIN_RULES = dict(  # the allowed values of TRAIN_DEFAULTS (config.configure checks them)
    init_from=one_of("scratch", "resume"), max_steps=at_least(0), lr_decay_steps=at_least(0),
    batch_size=at_least(1), grad_accum=at_least(1), lr=at_least(0.0), min_lr=at_least(0.0),
    warmup_steps=at_least(0), weight_decay=at_least(0.0), beta2=fraction(), grad_clip=at_least(0.0),
    eval_interval=at_least(1), eval_examples=at_least(0), log_interval=at_least(1),
    seed=at_least(0),
    device=one_of(*DEVICES), dtype=one_of("auto", "float32", "bfloat16", "float16"),
)


# --------------------------------------------------------------------------------------------------
# processes, devices, precision, seeds

@dataclass
class Runtime:
    """Where this process runs: its rank among world_size (torchrun), its device, and the autocast
    dtype."""
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


def setup(device="auto", dtype="auto", seed=1337):
    """torchrun's process group, the device, the autocast dtype, the seed. One process when not
    under torchrun."""
    env = (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1))  # set by torchrun
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in env)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config: device={device!r}, but torch finds no CUDA GPU (device=cpu?)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("config: device='mps', but torch finds no Apple GPU here (device=cpu?)")
    device = torch.device(f"cuda:{local_rank}" if device == "cuda" and world > 1 else device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    # auto: bf16 on a GPU that has it, else fp16; fp32 on the CPU, where bf16 pays off only for
    # large models on a CPU with native bf16 (docs/benchmarks.md).
    if dtype == "auto":
        dtype = "float32" if device.type != "cuda" else (
            "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    if dtype == "bfloat16" and device.type == "cpu" and not cpu_has_bf16():
        print("warning: dtype=bfloat16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16): "
              "its matmuls run 10-100x slower than float32 here (docs/benchmarks.md)")
    torch.manual_seed(seed)  # the same on every rank: the same initial weights (training: seed_all)
    return Runtime(rank, local_rank, world, device, getattr(torch, dtype))


def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without, bf16 is emulated."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def teardown(rt):
    if rt.world_size > 1:
        dist.destroy_process_group()


def seed_all(*key):
    """Seed torch's generators (CPU and every GPU) from a key of non-negative ints: every random
    draw of a training micro-batch (dropout, Bert4Rec's masks) is a function of (seed, 0, step,
    chunk), and of a validation batch of (seed, 1, batch), so any world size and any resume point
    compute the same numbers."""
    torch.manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]))


def all_reduce_sum(values, rt):
    """Sum a list of floats over all ranks (evaluation metrics, logged losses)."""
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    if rt.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def to_device(batch, device):
    """A batch dict of data.py (numpy arrays or tensors, or tuples of them: one per feature) on
    device."""
    def move(x):
        if isinstance(x, tuple):
            return tuple(move(t) for t in x)
        x = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        return x.to(device, non_blocking=True)
    return {k: move(v) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# batches that do not depend on the world size

def micro_batches(global_targets, rt, grad_accum):
    """This rank's micro-batches of a step's global batch, as (chunk index, example ids). The global
    batch is split into grad_accum equal chunks whatever the world size, and rank r takes chunks r,
    r + W, ...: so W processes compute exactly what 1 process does."""
    if grad_accum % rt.world_size or len(global_targets) % grad_accum:
        raise UserError(f"config: grad_accum={grad_accum} must be a multiple of the world size "
                        f"{rt.world_size} and divide batch_size={len(global_targets)}")
    chunks = global_targets.reshape(grad_accum, -1)
    return [(c, chunks[c]) for c in range(rt.rank, grad_accum, rt.world_size)]


def shard_batches(targets, batch_size, rt=None):
    """This rank's evaluation batches, as (batch index, example ids): the batches one process would
    make, dealt round-robin to the ranks, so that every batch (and so every reported number) is the
    same whatever the world size."""
    rank, world = (rt.rank, rt.world_size) if rt is not None else (0, 1)
    return [(i // batch_size, targets[i:i + batch_size])
            for i in range(rank * batch_size, len(targets), world * batch_size)]


def seeded_subset(targets, n, seed):
    """At most n examples of a split, the same seeded choice every time (n=0: all of them)."""
    if n and len(targets) > n:
        targets = np.sort(np.random.default_rng(seed).choice(targets, n, replace=False))
    return targets


# --------------------------------------------------------------------------------------------------
# optimisation (App. C: AdamW, linear warmup, cosine decay)

def get_lr(step, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at lr_decay_steps (0: max_steps),
    then flat."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer, lr):
    """The schedule's lr, times each parameter group's lr_mult (see adamw)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


def adamw(model, lr, weight_decay, betas=(0.9, 0.95), lr_mult=None):
    """AdamW with decoupled weight decay on matrices only (not on biases, LayerNorms, gates).
    lr_mult: {name part: multiplier} gives the parameters whose name contains it lr_mult x the
    schedule's learning rate."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            mult = next((m for part, m in (lr_mult or {}).items() if part in name), 1.0)
            decay = weight_decay if p.dim() >= 2 else 0.0
            groups.setdefault((decay, mult), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": wd, "lr_mult": m} for (wd, m), ps in groups.items()],
        lr=lr, betas=betas, foreach=False)  # foreach=False: bit-identical resume on CPU


def clip_and_step(optimizer, scaler, model, grad_clip):
    """Unscale (fp16), clip the gradient norm, step, zero the gradients."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def no_sync(model, sync):
    """DDP all-reduces gradients on the backward of the last micro-batch only (sync=True)."""
    return contextlib.nullcontext() if sync or not isinstance(model, DDP) else model.no_sync()


def check_train_config(cfg):
    """What can be checked before any work or any write to out_dir, beyond the value rules."""
    if cfg.init_from == "resume" and not os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt")):
        raise UserError(f"config: init_from='resume' but {os.path.join(cfg.out_dir, 'ckpt.pt')} "
                        "does not exist")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    if cfg.batch_size % cfg.grad_accum or cfg.grad_accum % world:
        raise UserError(f"config: grad_accum={cfg.grad_accum} must divide batch_size="
                        f"{cfg.batch_size} and be a multiple of the world size {world}")


# --------------------------------------------------------------------------------------------------
# a training run on disk

class Run:
    """A training run between steps and on disk, from scratch or resumed (init_from='resume'): the
    step, the best validation value so far, the training CPU-seconds, the GradScaler;
    out_dir/ckpt.pt (latest), best.pt (best validation of `select`, higher or lower is better),
    log.jsonl (one JSON row per training log and validation), config.json. Only the master process
    writes. out_dir is touched only once everything has been checked. select: the validation metric
    that picks best.pt."""

    def __init__(self, cfg, rt, model, optimizer, extra, select, higher_is_better=True,
                 units_per_example=1):
        from tqdm import tqdm
        self.cfg, self.rt, self.model, self.optimizer, self.extra = cfg, rt, model, optimizer, extra
        self.select, self.higher_is_better = select, higher_is_better
        self.units_per_example = units_per_example  # units_per_s counts these (the encoder: events)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
        self.step, self.best, self.metrics, self.cpu_s = 0, None, {}, 0.0
        self.validated = -1  # the step validated last (a resumed checkpoint holds its step's)
        if cfg.init_from == "resume":
            self.restore(os.path.join(cfg.out_dir, "ckpt.pt"))
            self.validated = self.step
            if rt.master:
                print(f"resumed from {cfg.out_dir}/ckpt.pt at step {self.step} "
                      f"(best so far {self.best:.4f})")
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")
        if rt.master:
            try:
                os.makedirs(cfg.out_dir, exist_ok=True)
                remove_stale_temporaries(cfg.out_dir)
                config = json.dumps(vars(cfg), indent=2)
                write_atomic(os.path.join(cfg.out_dir, "config.json"), config)
                # a resume keeps the log up to its step and redoes the rest: no step twice; the log
                # is replaced whole, so a kill now loses nothing
                rows = self.read_log() if cfg.init_from == "resume" else []
                write_atomic(self.log_path, "".join(json.dumps(r) + "\n" for r in rows))
                self.log_file = open(self.log_path, "a")
            except OSError as e:
                raise UserError(f"cannot write to {cfg.out_dir}: {e.strerror or e}") from None
        self.bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not rt.master,
                        dynamic_ncols=True)
        self.t0, self.t0_step = time.time(), self.step

    def wrap(self, model):
        """The model the loop runs: compiled (compile=True) and DDP-wrapped (under torchrun).
        self.model keeps the plain parameter names that checkpoints store."""
        if self.cfg.compile:
            model = torch.compile(model)
        if self.rt.world_size > 1:
            cuda = self.rt.device.type == "cuda"
            model = DDP(model, device_ids=[self.rt.local_rank] if cuda else None,
                        gradient_as_bucket_view=True)  # the gradients live in the buckets: no copy
        return model

    def due(self):
        """Whether this step validates: every eval_interval steps and at the end, once per step."""
        return ((self.step % self.cfg.eval_interval == 0 or self.step == self.cfg.max_steps)
                and self.step != self.validated)

    def validated_with(self, metrics):
        """Log this step's validation metrics; save best.pt when the selected one improved, then
        ckpt.pt (a resume continues from ckpt.pt)."""
        self.validated, self.metrics = self.step, metrics
        value = metrics[self.select]
        improved = self.best is None or (
            value > self.best if self.higher_is_better else value < self.best)
        self.best = value if improved else self.best
        if self.rt.master:
            self.bar.write(f"step {self.step}: "
                           + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            self.write({"step": self.step, **{f"val_{k}": v for k, v in metrics.items()},
                        "cpu_s": self.cpu_s})
            if improved:  # best.pt first: a kill between the two saves redoes this step on resume
                self.save(os.path.join(self.cfg.out_dir, "best.pt"))
            self.save(os.path.join(self.cfg.out_dir, "ckpt.pt"))

    def stepped(self, loss, lr, cpu_s, watch=None):
        """An optimizer step is done: count it and its CPU-seconds; every log_interval steps log the
        loss, lr, throughput, training CPU-seconds and the watched values (gates, the seen bias)."""
        self.step, self.cpu_s = self.step + 1, self.cpu_s + cpu_s
        self.bar.update(1)
        due = self.step % self.cfg.log_interval == 0 or self.step == self.cfg.max_steps
        if not self.rt.master or not due:
            return
        watch = watch or {}
        units = (self.step - self.t0_step) * self.cfg.batch_size * self.units_per_example
        rate = units / max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                             **{k: f"{v:+.2f}" for k, v in watch.items()})
        self.write({"step": self.step, "loss": loss, "lr": lr, "units_per_s": rate,
                    "cpu_s": self.cpu_s, **watch})
        self.t0, self.t0_step = time.time(), self.step

    def check_finite(self, loss):
        """A NaN/inf loss stops the run before the bad update, keeping the last good checkpoint."""
        if not math.isfinite(loss):
            self.close()
            raise UserError(f"loss is {loss} at step {self.step}: stopping. The last good "
                            f"checkpoint is {self.cfg.out_dir}/ckpt.pt (try a lower lr, or "
                            "dtype=float32)")

    def read_log(self):
        """The rows of log.jsonl up to the resumed step. A torn last line (a kill mid-write) is
        dropped with a warning; a damaged line elsewhere is an error."""
        if not os.path.isfile(self.log_path):
            return []
        with open(self.log_path) as f:
            lines = [line for line in f if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise UserError(f"{self.log_path}:{i + 1}: not a JSON row: the log is damaged")
                print(f"warning: {self.log_path}: dropped 1 torn last line (a kill mid-write)")
        return [r for r in rows if r["step"] <= self.step]

    def write(self, row):
        try:
            self.log_file.write(json.dumps(row) + "\n")
            self.log_file.flush()  # never lost to a kill
        except OSError as e:
            raise UserError(f"cannot write {self.log_path}: {e.strerror or e}") from None

    def save(self, path):
        save_checkpoint({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scaler": self.scaler.state_dict(), "step": self.step, "best": self.best,
                         "metrics": self.metrics, "cpu_s": self.cpu_s, "config": vars(self.cfg),
                         **self.extra}, path)

    def restore(self, path):
        """Continue from a checkpoint of this run (weights, optimizer, scaler, step), trained on
        this data. No RNG state: every random draw is seeded by (seed, step, chunk) (seed_all)."""
        ckpt = load_checkpoint(path, map_location=self.rt.device)
        if "data" in self.extra:
            check_data(ckpt["data"], self.extra["data"], path)
        load_weights(self.model, ckpt["model"], path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # another split of the parameters: another strategy, lr_mult
            raise UserError(f"{path}: its optimizer state does not fit this run's trained "
                            f"parameters (another strategy or learning-rate multiplier?): {e}")
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.best, self.metrics, self.cpu_s = (
            ckpt[k] for k in ("step", "best", "metrics", "cpu_s"))

    def close(self):
        self.bar.close()
        if self.rt.master:
            self.log_file.close()
            if self.step == self.cfg.max_steps:
                print(f"done: best validation {self.select} {self.best:.4f}; checkpoints "
                      f"{self.cfg.out_dir}/best.pt (best), {self.cfg.out_dir}/ckpt.pt (last)")


# --------------------------------------------------------------------------------------------------
# checkpoints

def write_atomic(path, data):
    """Write bytes or text to a temporary file, fsync, then rename: a kill mid-write never leaves a
    half file (a killed write's temporary is removed by remove_stale_temporaries)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_checkpoint(obj, path):
    """torch.save, atomically, with a checksum of its content that load_checkpoint verifies."""
    obj = {**obj, "checksum": checksum(obj)}
    try:
        write_atomic(path, lambda f: torch.save(obj, f))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def checksum(obj):
    """sha256 of a checkpoint's content: every tensor's dtype, shape and bytes and every other
    value, walked in a fixed order. Flipped bytes in the file change it."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, without a copy
        else:
            h.update(repr(x).encode())

    walk({k: v for k, v in obj.items() if k != "checksum"})
    return h.hexdigest()

def remove_stale_temporaries(out_dir):
    """Delete the temporaries of writes killed before their rename (a run owns its out_dir)."""
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else ():
        stem, _, pid = name.rpartition(".tmp")
        if stem.endswith((".pt", ".json", ".jsonl")) and pid.isdigit():
            os.remove(os.path.join(out_dir, name))


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint's dict, loaded as data (weights_only: never unpickled)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # it names a class or function: only unpickling calls them
            raise UserError(f"{path} holds code (a pickled class or function) and was not loaded: "
                            "a checkpoint is data") from None
        raise UserError(f"cannot read checkpoint {path}: not a checkpoint, or a damaged "
                        "one") from None
    except Exception as e:  # a truncated or foreign file: one line
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise UserError(f"cannot read checkpoint {path}: {why}") from None
    if not isinstance(ckpt, dict) or not {"config", "model", "checksum"} <= set(ckpt):
        raise UserError(f"{path} is not a checkpoint of train_encoder.py or train_llm.py")
    if checksum(ckpt) != ckpt["checksum"]:
        raise UserError(f"{path} is damaged: its content does not match its checksum")
    return ckpt


def check_data(stored, current, source):
    """Refuse to use a checkpoint (source) with data other than it was trained on: fingerprints from
    data.UserData.fingerprint(), compared on vocabularies, sizes and the checksum of the prepared
    arrays."""
    if any(stored[k] != current[k] for k in ("vocab_sizes", "n_users", "n_events", "sha256")):
        show = lambda fp: (f"{fp['path']} ({fp['n_users']:,} users, {fp['n_events']:,} events, "
                           f"vocabularies {'/'.join(map(str, fp['vocab_sizes']))}, "
                           f"sha256 {fp['sha256']})")
        raise UserError(f"{source} was trained on {show(stored)}, not on {show(current)}: refusing "
                        "the mismatch")


def data_path(stored, override, source):
    """The prepared folder a checkpoint was trained on (absolute), or --data_dir=override."""
    path = override or stored["path"]
    if not os.path.isfile(os.path.join(path, "meta.json")):
        where = f"--data_dir={override}" if override else f"its dataset {path}"
        raise UserError(f"{source}: {where} holds no prepared dataset; prepare it with data.py, or "
                        "point --data_dir= at the prepared folder")
    return path


def checkpoint_data(ckpt, path, data_dir=""):
    """The prepared dataset a checkpoint was trained on (or data_dir), refused if it is other
    data."""
    d = UserData(data_path(ckpt["data"], data_dir, path))
    check_data(ckpt["data"], d.fingerprint(), path)
    return d


def load_weights(model, state, path, strict=True):
    """model.load_state_dict(state, strict); a checkpoint that does not fit the model is one
    line."""
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit this model: {str(e).splitlines()[1].strip()[:300]}")


# --------------------------------------------------------------------------------------------------
# validation both loops run (and eval.py)

@contextlib.contextmanager
def evaluating(model, rt):
    """Eval mode, no gradients, the run's autocast; back to training mode after."""
    model.eval()
    with torch.no_grad(), rt.autocast():
        yield
    model.train()


def ranking_metrics(scores, target, ks=(1, 5, 10)):
    """scores (B, V) over all candidates, target (B,) ids -> mean Recall@k for each k, and NDCG@10.
    Ties count against the target (its rank is 1 + the number of other candidates scoring >= it): a
    constant scorer gets no credit."""
    s = scores.float()
    t = s.gather(1, target[:, None])  # (B, 1) the target's score
    rank = (s > t).sum(1) + (s == t).sum(1) - 1  # 0-based; ties against the target
    out = {f"recall@{k}": (rank < k).float().mean().item() for k in ks}
    gain = torch.where(rank < 10, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros_like(s[:, 0]))
    out["ndcg@10"] = gain.mean().item()
    return out


@torch.no_grad()
def evaluate_ranking(score_fn, d, targets, seq_len, label="item", batch_size=256, device="cpu",
                     loss_fn=None, rt=None, seed=0):
    """Mean ranking metrics of score_fn(hist) -> (B, V) over the examples `targets` (label 'item' or
    'fav'), plus the mean loss_fn(batch) if given (its random draws, Bert4Rec's masks, seeded by
    (seed, batch)). Under
    torchrun all ranks pass the same targets, each evaluates its share of the batches, and all get
    the global means (the same numbers as one process)."""
    sums, n = {}, 0
    for b, ids in shard_batches(targets, batch_size, rt):
        batch = to_device(d.batch(ids, seq_len), device)
        y = batch["target"][0] if label == "item" else batch["fav"]
        metrics = ranking_metrics(score_fn(batch["hist"]), y)
        if loss_fn is not None:
            seed_all(seed, 1, b)
            metrics["loss"] = loss_fn(batch).item()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * len(y)
        n += len(y)
    if rt is not None:  # every rank must hold the same keys, even one whose shard was empty
        keys = [f"recall@{k}" for k in (1, 5, 10)] + ["ndcg@10"]
        keys += ["loss"] if loss_fn is not None else []
        *values, n = all_reduce_sum([sums.get(k, 0.0) for k in keys] + [n], rt)
        sums = dict(zip(keys, values))
    return {k: v / max(n, 1) for k, v in sums.items()}


def reference_rows(d, split, targets, seq_len, label="item", batch_size=256, device="cpu"):
    """What a result is measured against: most popular (training counts) and, on the synthetic
    default, the oracle's expected Recall@k (the true next-item distribution, the hidden taste
    included: the ceiling)."""
    pop = torch.from_numpy(popularity(d, 0 if label == "item" else 1)).to(device)
    rows = {"most popular": evaluate_ranking(lambda h: pop.expand(len(h[0]), -1), d, targets,
                                             seq_len, label, batch_size, device)}
    if d.meta["dataset"] == "synthetic" and label == "item" and split in ("val", "test"):
        rows["oracle (expected)"] = oracle_recall(d, split, (1, 5, 10), targets)
    return rows


def eval_file(split, max_examples=0, seed=1337):
    """The results file of an evaluation, named by what it evaluated: eval_test.json for every test
    user, eval_test_500.json for a seeded 500 of them (eval_test_500_seed7.json with --seed=7)."""
    subset = f"_{max_examples}" + (f"_seed{seed}" if seed != 1337 else "")
    return f"eval_{split}{subset if max_examples else ''}.json"


@torch.no_grad()
def evaluate_loss(model, make_batch, targets, rt, batch_size=64):
    """Mean answer-token loss of a UserLLM over `targets` (all ranks pass the same; each evaluates
    its batches)."""
    total, n = 0.0, 0
    for _, ids in shard_batches(targets, batch_size, rt):
        total += model(make_batch(ids)).item() * len(ids)
        n += len(ids)
    total, n = all_reduce_sum([total, n], rt)
    return {"loss": total / max(n, 1)}


# --------------------------------------------------------------------------------------------------
# measuring (flops.py, bench.py)

def print_table(rows, title=None, columns=None):
    """rows: a list of dicts (or {name: dict}: the name is the first column) -> an aligned text
    table. columns: (header, key, format) each; by default every key any row has, in order of
    appearance, floats as .4f. A value a row lacks, or None, prints as '-' (blank for the default
    columns)."""
    if isinstance(rows, dict):
        rows = [{"": name, **r} for name, r in rows.items()]
    if columns is None:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        columns = [(k, k, "" if k == "" else ".4f") for k in keys]
    fmt = lambda v, f: ("-" if v is None else format(v, f) if f and isinstance(v, (int, float))
                        else str(v))
    cells = [[h for h, _, _ in columns]]
    cells += [[fmt(r[k], f) if k in r else "" for _, k, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    if title:
        print(f"\n{title}")
    for row in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))


def cpu_sdpa_flops():
    """torch.utils.flop_counter has no formula for PyTorch's CPU attention kernel: count it as the
    GPU kernels are counted (the full T x T square, forward and backward). A custom_mapping for
    FlopCounterMode."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count
    ops = torch.ops.aten
    return {ops._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, **kw: sdpa_flop_count(q, k, v),
            ops._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad_out, q, k, v, *args, **kw: sdpa_backward_flop_count(grad_out, q, k, v)}


def time_train_step(model, batch, steps):
    """Median wall-clock ms of a training step (forward, backward, AdamW) after one warmup step;
    batch prebuilt."""
    opt, times = adamw(model, 1e-5, 0.0), []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        model(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])


def six_nd(params, tokens):
    """Training FLOPs by the 6·N·D rule: 2 per parameter per token forward, 4 backward."""
    return 6 * params * tokens


# dense bf16 FLOP/s per GPU (SXM unless named); other devices: no MFU shown
PEAK_FLOPS = {"H100": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name):
    """Dense bf16 (= fp16) peak FLOP/s of a device by its name (the longest key it contains); None
    if unknown."""
    keys = [k for k in PEAK_FLOPS if k in device_name]
    return PEAK_FLOPS[max(keys, key=len)] if keys else None

"""
The user encoders (paper Sec 3.1, App. A) and the baselines the paper compares them with (Table 2):
- UserEncoder: User-LLM's multi-feature autoregressive Transformer (early fusion, causal, next-event
  loss);
- Bert4Rec:    the same network, bidirectional, trained with the cloze objective;
- DualEncoder: late fusion, one Transformer per feature in a user tower, and a label tower.

    python train_encoder.py configs/synthetic_enc.py      (pretraining; eval.py ranks the catalogue)

UserEncoder.embed gives the per-event user embeddings the LLM reads (userllm.py).

Dimension letters: B batch, N history length, T events given to the Transformer (N, or N+1 with the
target or [MASK] event appended), F event features (item, genre/category, rating), d_f width of
feature f's embedding, C transformer width (n_embd), V_f vocabulary size of feature f (padding id 0
included), K user embeddings (Dual Encoder), L labels (items, or genres when label_task='fav'), S
events an output has seen.

Conventions of all three:
- An event is padding iff its item id (feature 0) is 0; the other features of a padding event are
  ignored.
- Histories are left-padded. Positions count from the user's first real event, and nobody attends to
  padding: adding left padding never changes anything at real positions.
- Padding id 0 (and Bert4Rec's [MASK] id) get logit -inf: never predicted, in no softmax.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import TRAIN_DEFAULTS, TRAIN_RULES
from config import UserError, at_least, fraction, one_of
from fused import linear_cross_entropy
from model import MLP, Block, init_weights

KINDS = ("ar", "bert4rec", "dual")
DEFAULTS = dict(  # every key of a train_encoder.py config (configs/synthetic_enc.py, ml20m.py, ...)
    dataset="synthetic", data_dir="",  # data_dir '' -> data/<dataset>
    seq_len=50, min_history=1,  # N events per example; a target needs min_history events before it
    kind="ar", feature_dims=(64, 16, 16), n_embd=128, n_layer=2, n_head=4, dropout=0.0,
    loss_weights=(1.0, 1.0, 1.0), mask_prob=0.2, n_user_embs=1, label_task="next_item",
    user_features=(),
    seen_bias=False, seen_bias_lr_mult=10.0,  # ours (docs/deviations.md)
    fused_loss=True,  # the same loss, computed faster (fused.py)
    **TRAIN_DEFAULTS,
)
RULES = dict(  # the values DEFAULTS' keys allow (config.configure checks them)
    seq_len=at_least(1), min_history=at_least(1), kind=one_of(*KINDS), feature_dims=at_least(1),
    n_embd=at_least(1), n_layer=at_least(1), n_head=at_least(1), dropout=fraction(),
    loss_weights=at_least(0.0), mask_prob=fraction(upper_open=False), n_user_embs=at_least(1),
    label_task=one_of("next_item", "fav"), user_features=at_least(0),
    seen_bias_lr_mult=at_least(0.0), **TRAIN_RULES,
)


@dataclass
class EncoderConfig:
    vocab_sizes: tuple = (1001, 21, 11)    # per feature, padding id 0 included (data.UserData)
    feature_dims: tuple = (64, 16, 16)     # per-feature embedding widths, concatenated: early fusio
    n_embd: int = 128                      # transformer width; a Linear maps the fused event to it
    n_layer: int = 2
    n_head: int = 4
    block_size: int = 51                   # max events in one sequence (N history + 1 appended)
    dropout: float = 0.0
    bias: bool = True
    loss_weights: tuple = (1.0, 1.0, 1.0)  # per-feature weights of the next-event (or cloze) loss
    kind: str = "ar"                       # 'ar' (User-LLM), 'bert4rec', 'dual' (Dual Encoder)
    mask_prob: float = 0.2                 # bert4rec's cloze masking probability
    n_user_embs: int = 1                   # dual: user embeddings the user tower emits
    label_task: str = "next_item"          # dual: 'next_item' or 'fav' (favourite genre/category)
    user_features: tuple = ()              # dual: the features its user tower reads (): see there
    seen_bias: bool = False                # a learned logit on the items already seen (ours)
    fused_loss: bool = True                # the loss by fused.linear_cross_entropy: same, faster

    def __post_init__(self):
        # A checkpoint stores the config as JSON, which turns tuples into lists.
        self.vocab_sizes, self.feature_dims, self.loss_weights, self.user_features = (
            tuple(self.vocab_sizes), tuple(self.feature_dims), tuple(self.loss_weights),
            tuple(self.user_features))
        if not len(self.vocab_sizes) == len(self.feature_dims) == len(self.loss_weights):
            raise UserError(f"config: vocab_sizes, feature_dims and loss_weights need one entry "
                            f"per feature, got {len(self.vocab_sizes)}, {len(self.feature_dims)}, "
                            f"{len(self.loss_weights)}")
        if min(self.vocab_sizes) < 2:
            raise UserError(f"config: every vocab size must be >= 2 (padding id 0 plus real ids), "
                            "got "
                            f"{self.vocab_sizes}")
        if self.kind not in KINDS:
            raise UserError(f"config: kind must be one of {KINDS}, got {self.kind!r}")
        if self.label_task not in ("next_item", "fav"):
            raise UserError(f"config: label_task must be 'next_item' or 'fav', got "
                            f"{self.label_task!r}")
        if self.label_task == "fav" and len(self.vocab_sizes) < 2:
            raise UserError("config: label_task='fav' needs a genre/category feature (feature 1)")
        if self.n_embd % self.n_head:
            raise UserError(f"config: n_embd={self.n_embd} must be divisible by "
                            f"n_head={self.n_head}")
        if not 0.0 < self.mask_prob <= 1.0:
            raise UserError(f"config: mask_prob must be in (0, 1], got {self.mask_prob}")
        if self.n_user_embs < 1:
            raise UserError(f"config: n_user_embs must be >= 1, got {self.n_user_embs}")
        if any(not 0 <= f < len(self.vocab_sizes) for f in self.user_features):
            raise UserError(f"config: user_features {self.user_features} name features 0.."
                            f"{len(self.vocab_sizes) - 1} only")
        if self.seen_bias and self.label == "fav":
            raise UserError("config: seen_bias is a bias on items; a DualEnc with label_task='fav' "
                            "ranks genres")

    @property
    def label(self):
        """What the encoder ranks: the next 'item', or the favourite genre/category ('fav', a
        DualEnc's)."""
        return "fav" if self.kind == "dual" and self.label_task == "fav" else "item"


def history_positions(seq_len):
    """Positions an encoder needs for histories of seq_len events: one more, for the appended target
    or [MASK]."""
    return seq_len + 1


def encoder_config(cfg, vocab_sizes):
    """The EncoderConfig of a train_encoder.py config on a dataset's vocabularies."""
    keys = ("feature_dims", "n_embd", "n_layer", "n_head", "dropout", "loss_weights", "kind",
            "mask_prob", "n_user_embs", "label_task", "user_features", "seen_bias", "fused_loss")
    return EncoderConfig(vocab_sizes=tuple(vocab_sizes), block_size=history_positions(cfg.seq_len),
                         **{k: getattr(cfg, k) for k in keys})


def masked_cross_entropy(logits, targets):
    """Mean cross-entropy over the entries whose target is not padding (id 0). logits (..., V),
    targets (...). 0, not NaN, when every target is padding."""
    keep = targets != 0
    return F.cross_entropy(logits[keep], targets[keep], reduction="sum") / keep.sum().clamp(min=1)


def seen_mask(cols, V):
    """(K, S) column indices, -1 = none -> (K, V) float: 1 at the columns each row lists, 0
    elsewhere."""
    m = torch.zeros(cols.shape[0], V + 1, device=cols.device)
    return m.scatter_(1, torch.where(cols < 0, V, cols), 1.0)[:, :V]


def seen_ids(items, causal):
    """(B, T) item ids of a Transformer's input events (0: padding or [MASK]) -> (B, T, T): at each
    position the ids among the events its output sees (events 0..t when causal, all of them when
    not), 0 elsewhere."""
    T = items.shape[1]
    seen = items[:, None, :].expand(-1, T, -1)
    if not causal:
        return seen
    return seen.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=items.device).tril(), 0)


def with_target(batch):
    """The data dict -> F x (B, N+1): each feature's history with the target event appended."""
    return [torch.cat([h, t[:, None]], dim=1) for h, t in zip(batch["hist"], batch["target"])]


class EventTrunk(nn.Module):
    """The trunk all three encoders share (Sec 3.1): one embedding table per event feature, an
    event's feature embeddings concatenated (early fusion) and mapped to width C by a Linear,
    learned positions, pre-LN Blocks, a final LayerNorm."""

    def __init__(self, cfg, causal, n_extra_ids=0):
        super().__init__()
        self.block_size = cfg.block_size
        # n_extra_ids: Bert4Rec adds one id, [MASK] = V_f, to every feature's vocabulary.
        self.wte = nn.ModuleList(nn.Embedding(v + n_extra_ids, d)
                                 for v, d in zip(cfg.vocab_sizes, cfg.feature_dims))
        self.fuse = nn.Linear(sum(cfg.feature_dims), cfg.n_embd, bias=cfg.bias)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg.n_embd, cfg.n_head, cfg.dropout, cfg.bias, causal)
                               for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)

    def forward(self, feats, real=None):
        """feats: F x (B, T) ids -> (h (B, T, C), real (B, T) bool, True at real events: by default
        those with an item, feature 0)."""
        if len(feats) != len(self.wte):
            raise ValueError(f"expected {len(self.wte)} event features, got {len(feats)}")
        T = feats[0].shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence of {T} events is longer than block_size={self.block_size}")
        real = feats[0] != 0 if real is None else real
        pos = (real.cumsum(1) - 1).clamp(min=0)  # (B, T): index among the real events
        feats = [x.masked_fill(~real, 0) for x in feats]  # a padding event's features are ignored
        x = torch.cat([emb(x) for emb, x in zip(self.wte, feats)], dim=-1)  # early fusion
        x = self.drop(self.fuse(x) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x, real)
        return self.ln_f(x), real


class UserEncoder(nn.Module):
    """User-LLM's autoregressive user encoder (Sec 3.1, App. A): a causal Transformer over fused
    events, pretrained to predict every feature of the next event. Each output is projected back
    into feature f's space (Linear C -> d_f) and scored against feature f's own input table (tied
    weights). seen_bias (ours, off by default; docs/deviations.md): one learned number added to the
    logits of the items among the events an output has seen."""
    kind, causal, n_extra_ids = "ar", True, 0  # Bert4Rec changes these three and nothing else here
    heads = ("proj", "seen_bias")  # only pretraining uses them (an LLM, through embed(), does not)

    def __init__(self, cfg):
        super().__init__()
        if cfg.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs kind={self.kind!r}, got {cfg.kind!r}")
        self.cfg = cfg
        self.trunk = EventTrunk(cfg, self.causal, self.n_extra_ids)
        self.proj = nn.ModuleList(nn.Linear(cfg.n_embd, d, bias=cfg.bias) for d in cfg.feature_dims)
        self.seen_bias = nn.Parameter(torch.zeros(())) if cfg.seen_bias else None
        self.apply(init_weights)

    def logits(self, h, f, seen=None):
        """(..., C) -> (..., V_f + n_extra_ids) logits of feature f, padding and [MASK] at -inf.
        seen (..., S): the item ids each output has seen (0 = none), for feature 0's seen bias."""
        table = self.trunk.wte[f].weight  # (V_f + n_extra_ids, d_f): the input table itself, tied
        logits = self.proj[f](h) @ table.T
        if f == 0 and self.seen_bias is not None:  # padding's id 0 marks column 0, -inf below
            seen_items = seen_mask(seen.flatten(0, -2), len(table)).view(logits.shape)
            logits = logits + self.seen_bias * seen_items
        ids = torch.arange(table.shape[0], device=h.device)
        return logits.masked_fill((ids == 0) | (ids >= self.cfg.vocab_sizes[f]), float("-inf"))

    def feature_loss(self, h, targets, seen=None):
        """Sum over features f of loss_weights[f] x the cross-entropy of f's tied logits at h (B, T,
        C) against targets[f] (B, T) (0: no target). seen (B, T, S): the items each output has seen
        (seen bias)."""
        if self.cfg.fused_loss:  # the same number, computed faster
            return sum(w * self.fused_target_loss(h, targets[f], f, seen)
                       for f, w in enumerate(self.cfg.loss_weights) if w != 0)
        return sum(w * masked_cross_entropy(self.logits(h, f, seen), targets[f])
                   for f, w in enumerate(self.cfg.loss_weights) if w != 0)

    def fused_target_loss(self, h, targets, f, seen=None):
        """masked_cross_entropy(self.logits(h, f, seen), targets), computed only where it counts:
        the positions with a target, against the real ids 1..V_f - 1 (the -inf columns add nothing
        to a softmax), through fused.linear_cross_entropy. Equal to float tolerance
        (tests/test_fused.py)."""
        keep = targets != 0
        table = self.trunk.wte[f].weight[1:self.cfg.vocab_sizes[f]]  # (V_f - 1, d_f): real ids
        x = self.proj[f](h[keep])  # (K, d_f), K = targets to predict
        b = self.seen_bias if f == 0 else None
        cols = None if b is None else seen[keep] - 1  # (K, S): seen ids as columns; padding: -1
        rows = None if b is None else (lambda i, j: seen_mask(cols[i:j], len(table)))
        return linear_cross_entropy(x, table, targets[keep] - 1, rows, b) / keep.sum().clamp(min=1)

    def loss(self, batch):
        """Next-event cross-entropy, every feature, at every real position of the history + target
        sequence."""
        seq = with_target(batch)  # F x (B, N+1)
        inputs = [x[:, :-1] for x in seq]
        h, real = self.trunk(inputs)  # (B, N, C): the output at t has seen events 0..t
        # The first real event is no target: nothing came before it.
        targets = [x[:, 1:].masked_fill(~real, 0) for x in seq]
        seen = seen_ids(inputs[0], causal=True) if self.seen_bias is not None else None
        return self.feature_loss(h, targets, seen)

    def forward(self, batch):
        return self.loss(batch)  # what the training loop (and DDP's gradient hooks) call

    def embed(self, hist):
        """F x (B, N) history -> (per-event user embeddings (B, N, C), real (B, N)); zeros at
        padding."""
        h, real = self.trunk(hist)
        return h * real[..., None], real

    def scores(self, hist):
        """F x (B, N) history -> (B, V_item) logits of the next item (the last event is real: left
        padding)."""
        h, _ = self.trunk(hist)
        return self.logits(h[:, -1], 0, hist[0])


class Bert4Rec(UserEncoder):
    """Bert4Rec (Sun et al., 2019; paper Table 2): UserEncoder's network, bidirectional, trained
    with the cloze objective. Every feature's vocabulary gets one extra id, [MASK] = V_f; a masked
    event has all its features replaced by [MASK]. The next event is predicted by appending a [MASK]
    event."""
    kind, causal, n_extra_ids = "bert4rec", False, 1

    def cloze_mask(self, real):
        """real (B, T) bool -> masked (B, T) bool: each real event with probability mask_prob, at
        least one real event per sequence that has any, never padding."""
        r = torch.rand(real.shape, device=real.device)
        masked = (r < self.cfg.mask_prob) & real
        # Where the coin masked nothing, mask the real event with the largest draw: uniform among
        # real events.
        pick = F.one_hot(r.masked_fill(~real, -1.0).argmax(1), real.shape[1]).bool() & real
        return masked | (pick & ~masked.any(1, keepdim=True))

    def mask_events(self, seq, masked):
        """F x (B, T) ids, masked (B, T) -> F x (B, T) ids, every feature of a masked event set to
        [MASK]."""
        return [x.masked_fill(masked, v) for x, v in zip(seq, self.cfg.vocab_sizes)]

    def cloze_loss(self, seq, masked):
        """Cross-entropy of the masked events' features, given the sequence with those events
        masked."""
        h, _ = self.trunk(self.mask_events(seq, masked))
        seen = None
        if self.seen_bias is not None:
            seen = seen_ids(seq[0].masked_fill(masked, 0), causal=False)
        return self.feature_loss(h, [x.masked_fill(~masked, 0) for x in seq], seen)

    def loss(self, batch):
        seq = with_target(batch)  # F x (B, N+1)
        return self.cloze_loss(seq, self.cloze_mask(seq[0] != 0))

    def scores(self, hist):
        """F x (B, N) history -> (B, V_item) next-item logits: the output at an appended [MASK]
        event, the [MASK] column dropped so that column i is item i."""
        mask_event = [torch.full_like(x[:, :1], v) for x, v in zip(hist, self.cfg.vocab_sizes)]
        h, _ = self.trunk([torch.cat([x, m], dim=1) for x, m in zip(hist, mask_event)])
        return self.logits(h[:, -1], 0, hist[0])[:, :self.cfg.vocab_sizes[0]]


class DualEncoder(nn.Module):
    """Dual Encoder (paper App. A: the late-fusion encoder, a baseline of Table 2). User tower: one
    causal Transformer per feature it reads (user_features), each over that feature alone; their
    outputs at the latest event are combined by fusion layers (an MLP) into K user embeddings
    (K = n_user_embs). Label tower: the label's embedding plus a residual MLP. A label's score is
    max_k <u_k, e_l>, a softmax over the whole catalogue. label_task: 'next_item' (labels: items) or
    'fav' (the favourite genre/category; the user tower then reads the items alone)."""
    kind = "dual"
    heads = ("label_emb", "label_mlp", "seen_bias")  # as UserEncoder.heads

    def __init__(self, cfg):
        super().__init__()
        if cfg.kind != self.kind:
            raise ValueError(f"DualEncoder needs EncoderConfig(kind='dual'), got kind={cfg.kind!r}")
        self.cfg, C, K = cfg, cfg.n_embd, cfg.n_user_embs
        self.features = cfg.user_features or (
            (0,) if cfg.label_task == "fav" else tuple(range(len(cfg.vocab_sizes))))
        self.towers = nn.ModuleList(EventTrunk(one_feature(cfg, f), causal=True)
                                    for f in self.features)
        self.fusion = nn.Sequential(nn.Linear(len(self.features) * C, C, bias=cfg.bias),
                                    nn.GELU(approximate="tanh"), nn.Linear(C, K * C, bias=cfg.bias))
        n_labels = cfg.vocab_sizes[0 if cfg.label_task == "next_item" else 1]
        self.label_emb = nn.Embedding(n_labels, C)
        self.label_mlp = MLP(C, cfg.dropout, cfg.bias)
        self.seen_bias = nn.Parameter(torch.zeros(())) if cfg.seen_bias else None  # UserEncoder's
        self.apply(init_weights)

    def forward(self, batch):
        return self.loss(batch)

    def embed(self, hist):
        """F x (B, N) history -> (user embeddings (B, K, C), mask (B, K) all True)."""
        real = hist[0] != 0  # (B, N): an event is real iff it has an item
        latest = [tower([hist[f]], real)[0][:, -1] for f, tower in zip(self.features, self.towers)]
        B, K = real.shape[0], self.cfg.n_user_embs
        u = self.fusion(torch.cat(latest, dim=-1)).view(B, K, -1)  # (B, K, C): late fusion
        return u, torch.ones(B, K, dtype=torch.bool, device=u.device)

    def scores(self, hist):
        """F x (B, N) history -> (B, L) logits over all labels (items, or genres for 'fav'); padding
        -inf."""
        u, _ = self.embed(hist)
        e = self.label_emb.weight
        e = e + self.label_mlp(e)  # (L, C): the label tower, applied to every label at once
        s = torch.einsum("bkc,lc->bkl", u, e).amax(1)  # (B, L): by the best of the K embeddings
        if self.seen_bias is not None:  # padding's id 0 marks column 0, -inf below
            s = s + self.seen_bias * seen_mask(hist[0], s.shape[1])
        return s.masked_fill(torch.arange(s.shape[1], device=s.device) == 0, float("-inf"))

    def loss(self, batch):
        label = batch["target"][0] if self.cfg.label_task == "next_item" else batch["fav"]
        return masked_cross_entropy(self.scores(batch["hist"]), label)


def one_feature(cfg, f):
    """The EncoderConfig of a Dual Encoder's tower over feature f alone."""
    return replace(cfg, vocab_sizes=(cfg.vocab_sizes[f],), feature_dims=(cfg.feature_dims[f],),
                   loss_weights=(1.0,), kind="ar", label_task="next_item", seen_bias=False,
                   user_features=())


def make_encoder(cfg):
    """The encoder class that cfg.kind names."""
    return {"ar": UserEncoder, "bert4rec": Bert4Rec, "dual": DualEncoder}[cfg.kind](cfg)

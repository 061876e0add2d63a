"""
The LLM side of User-LLM (paper Sec 3.2, App. B): a GPT-2-architecture language model that reads
user embeddings.

- `attention` is the project's one attention; `Block` its one Transformer block (the user encoder's
  too).
- `GPT` keeps GPT-2's parameter names, so GPT-2 checkpoints load one-to-one (gpt2.py).
- Fusion (Sec 3.2.1, App. B): `GatedCrossAttention` (Flamingo's tanh-gated cross-attention dense
  block) before every `xattn_every`-th GPT block, or a `SoftPrompt` prefix; `Recency` tells
  attention which event is the latest.
- `LoRALinear` (Sec 3.2.3, strategy "lora"): low-rank updates that start at zero.
- `KVCache`: what decoding keeps between calls (decode.py: generation, beam search, exact ranking).

    python train_llm.py configs/synthetic_llm.py      (the model is composed in userllm.py)

Dimension letters: B batch, T token positions, P prefix positions, L cached positions, M user events
(or latents), C channels (n_embd), D the user-embedding width (d_user), nh heads, hs head size, V
vocabulary.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention(q, k, v, n_head, mask=None, is_causal=False, dropout_p=0.0):
    """Multi-head scaled dot-product attention (PyTorch SDPA). q (B, Tq, C), k and v (B, Tk, C) ->
    (B, Tq, C). mask: (B, Tq or 1, Tk) bool, True = may attend; or float, added to the logits."""
    B, Tq, C = q.shape
    Tk = k.size(1)
    q = q.view(B, Tq, n_head, C // n_head).transpose(1, 2)  # (B, nh, Tq, hs)
    k, v = (t.view(B, Tk, n_head, C // n_head).transpose(1, 2) for t in (k, v))  # (B, nh, Tk, hs)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                       dropout_p=dropout_p, is_causal=is_causal)
    return y.transpose(1, 2).contiguous().view(B, Tq, C)  # (B, Tq, C): the heads re-assembled


def init_weights(module):
    """GPT-2's initialisation, as nanoGPT's: N(0, 0.02) weights, zero biases
    (model.apply(init_weights))."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with GPT-2's parameter names (c_attn, c_proj). causal=False for
    Bert4Rec."""

    def __init__(self, n_embd, n_head, dropout=0.0, bias=True, causal=True):
        super().__init__()
        assert n_embd % n_head == 0, f"n_embd={n_embd} must be divisible by n_head={n_head}"
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.dropout, self.causal = n_head, dropout, causal

    def forward(self, x, key_mask=None, kv_cache=None):
        # key_mask: (B, L + T) bool, True where the key is real (not padding); None: all real. Or
        # (B, T, L + T): each query's own keys, used as given (token trees, decode.tree_logits).
        # kv_cache: a LayerKV with the L earlier positions' keys/values; x holds the T new
        # positions.
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, L + T, C)
        L = k.size(1) - T
        mask = None
        if key_mask is not None and key_mask.dim() == 3:
            mask = key_mask
        elif key_mask is not None or L > 0:
            # query t sits at position L + t; it may see key s when s is real and (if causal) s <= L
            # + t ...
            real = key_mask
            if real is None:
                real = torch.ones(B, L + T, dtype=torch.bool, device=x.device)
            mask = real[:, None, :]  # (B, 1, L + T)
            if self.causal:
                mask = mask & torch.ones(T, L + T, dtype=torch.bool, device=x.device).tril(L)
            # ... and always sees itself, so a padding query's softmax row is never empty (no NaN).
            query_pos = L + torch.arange(T, device=x.device)[:, None]  # (T, 1)
            mask = mask | (torch.arange(L + T, device=x.device) == query_pos)
        y = attention(q, k, v, self.n_head, mask, is_causal=self.causal and mask is None,
                      dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd, dropout=0.0, bias=True, hidden=0):
        super().__init__()
        hidden = hidden or 4 * n_embd
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN Transformer block (GPT-2): x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd, n_head, dropout=0.0, bias=True, causal=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, causal)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x, key_mask=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), key_mask, kv_cache)
        return x + self.mlp(self.ln_2(x))


# --------------------------------------------------------------------------------------------------
# LoRA (Sec 3.2.3, strategy "lora")

class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update (alpha / r) B A x (Hu et al. 2021). weight and bias keep
    their names, so GPT-2 weights load unchanged; B starts at zero, so the layer starts as the plain
    linear."""

    def __init__(self, in_features, out_features, bias=True, rank=8, alpha=16.0):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear; any A, while B is 0
        self.scaling = alpha / rank

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def add_lora(blocks, rank, alpha, mlp=False):
    """Swap the attention (and optionally MLP) projections of every Block for LoRALinear, keeping
    their weights."""
    names = [("attn", "c_attn"), ("attn", "c_proj")]
    names += [("mlp", "c_fc"), ("mlp", "c_proj")] if mlp else []
    for block in blocks:
        for parent, name in names:
            old = getattr(getattr(block, parent), name)
            new = LoRALinear(old.in_features, old.out_features, old.bias is not None, rank, alpha)
            new = new.to(old.weight)
            new.load_state_dict(old.state_dict(), strict=False)  # weight, bias; lora_A/B: init
            setattr(getattr(block, parent), name, new)


# --------------------------------------------------------------------------------------------------
# Fusion of user embeddings into the LLM (Sec 3.2.1 cross-attention, App. B soft prompt)

class CrossAttention(nn.Module):
    """Queries from x (width d_q), keys and values from a context (width d_kv), attending at an
    inner width d_inner; the output is projected back to d_q. GatedCrossAttention's and the
    Perceiver's."""

    def __init__(self, d_q, d_kv, n_head, d_inner, dropout=0.0, bias=True):
        super().__init__()
        assert d_inner % n_head == 0, f"width {d_inner} is not divisible by {n_head} heads"
        self.q = nn.Linear(d_q, d_inner, bias=bias)
        self.kv = nn.Linear(d_kv, 2 * d_inner, bias=bias)
        self.proj = nn.Linear(d_inner, d_q, bias=bias)
        self.n_head, self.dropout = n_head, dropout

    def project_kv(self, context):
        """context (B, M, d_kv) -> keys, values (B, M, d_inner); once per sequence when decoding."""
        return self.kv(context).chunk(2, dim=2)

    def forward(self, x, kv, mask=None):
        # x (B, T, d_q); kv from project_kv; mask (B, M) bool, True = real. A row without a single
        # real key attends to all of them instead (finite, never NaN); GatedCrossAttention discards
        # that output. Or mask (B, T, M) float: added to the attention logits as given (the
        # Perceiver's read bias).
        if mask is not None and mask.dtype == torch.bool:
            mask = (mask | ~mask.any(1, keepdim=True))[:, None, :]  # (B, 1, M)
        y = attention(self.q(x), *kv, self.n_head, mask,
                      dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y)  # (B, T, d_q)


class GatedCrossAttention(nn.Module):
    """Flamingo's gated cross-attention dense block (Sec 3.2.1): the text attends to the user
    embeddings, then an FFW, each added through a tanh gate. Keys and values are projected from
    d_user inside the block. Flamingo starts the gates at 0, where the block is exactly the
    identity; ours start at gate_init = 0.01 (behind a zero gate the block gets no gradient:
    docs/deviations.md). A user with no real event gets no update at all."""

    def __init__(self, n_embd, d_user, n_head, d_inner, dropout=0.0, bias=True, gate_init=0.01,
                 d_ffw=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CrossAttention(n_embd, d_user, n_head, d_inner, dropout, bias)
        self.gate_attn = nn.Parameter(torch.full((1,), gate_init))
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias, d_ffw)  # d_ffw 0: 4 x n_embd, as Flamingo
        self.gate_ff = nn.Parameter(torch.full((1,), gate_init))

    def forward(self, x, kv, user_mask=None):
        # x (B, T, C); kv = self.attn.project_kv(user) for user (B, M, D); user_mask (B, M) bool,
        # True = real.
        has_user = 1.0 if user_mask is None else user_mask.any(1).to(x.dtype)[:, None, None]
        x = x + has_user * torch.tanh(self.gate_attn) * self.attn(self.ln_1(x), kv, user_mask)
        return x + has_user * torch.tanh(self.gate_ff) * self.mlp(self.ln_2(x))


def recency_index(mask):
    """mask (B, N) bool, True = real event -> (B, N) int64: how many real events come after each (0
    = latest)."""
    return mask.flip(1).cumsum(1).flip(1) - mask.long()


class Recency(nn.Module):
    """Ours (docs/deviations.md): a learned embedding of each event's recency, added to the user
    embeddings before they are attended to. Attention sees a set; without it nothing tells the
    latest event (whose embedding predicts what comes next) from the 49 before it. Index k = the
    number of real events after this one, so padding changes nothing. Starts at std 1, as Flamingo's
    time embeddings. Looked up with F.embedding: the backward of tensor indexing adds repeated rows
    in a thread-dependent order on CPU; embedding's does not."""

    def __init__(self, max_events, d):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(max_events, d))

    def forward(self, x, mask):
        # x (B, N, D) user embeddings; mask (B, N) bool, True = real event. Returns x + the recency
        # embedding.
        return x + F.embedding(recency_index(mask).clamp(max=self.emb.size(0) - 1), self.emb)


class SoftPrompt(nn.Module):
    """Soft-prompt fusion (App. B): the user embeddings projected to the LLM width by a two-layer
    MLP and a learned task prompt of n_task_tokens in front, prepended to the text (the MLP and the
    task tokens are ours: the paper does not give the projection; docs/deviations.md).
    forward(user (B, M, D), user_mask (B, M)) -> prefix (B, n_task + M, C), prefix_mask."""

    def __init__(self, d_user, n_embd, n_task_tokens):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(d_user, n_embd), nn.GELU(approximate="tanh"),
                                  nn.Linear(n_embd, n_embd))
        self.task = nn.Parameter(torch.randn(n_task_tokens, n_embd) * 0.02)

    def forward(self, user, user_mask=None):
        B, M, _ = user.shape
        if user_mask is None:
            user_mask = torch.ones(B, M, dtype=torch.bool, device=user.device)
        task = self.task.expand(B, -1, -1)  # (B, n_task, C)
        prefix = torch.cat([task, self.proj(user)], dim=1)  # (B, n_task + M, C)
        task_mask = torch.ones(B, task.size(1), dtype=torch.bool, device=user.device)
        return prefix, torch.cat([task_mask, user_mask], dim=1)


# --------------------------------------------------------------------------------------------------
# What decoding keeps between forward calls (decode.py)

class LayerKV:
    """One self-attention layer's keys and values of the positions seen so far, (B, L, C) each."""

    def __init__(self, k=None, v=None):
        self.k, self.v = k, v

    def update(self, k, v):
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)  # (B, L + T, C)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """Each layer's self-attention keys and values, the cross-attention's (projected from the user
    embeddings once per sequence), the key padding mask of every position so far and the count of
    real positions (the next position id)."""

    def __init__(self, n_layer):
        self.layers = [LayerKV() for _ in range(n_layer)]
        self.xattn_kv, self.user_mask = None, None  # {layer: (k, v)}, (B, M)
        self.key_mask, self.n_real = None, None  # (B, L) bool, (B,) long


# --------------------------------------------------------------------------------------------------
# The GPT

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    d_user: int = 0  # width of the user embeddings the cross-attention reads (0: none)
    xattn_every: int = 1  # a gated cross-attention block before LLM blocks 0, k, 2k, ... (k: this)
    xattn_dim: int = 0  # the cross-attention's inner width (0: n_embd)
    xattn_heads: int = 0  # 0: n_head
    xattn_ffw: int = 0  # the gated FFW's hidden width (0: 4 x n_embd)
    gate_init: float = 0.01  # the gates' start, before tanh (Flamingo: 0; ours: docs/deviations.md)
    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float = 16.0
    lora_mlp: bool = False  # LoRA on the MLP projections too


class GPT(nn.Module):
    """GPT-2 with GPT-2's parameter names (transformer.wte/wpe/h/ln_f, lm_head tied to wte). The
    cross-attention blocks live in self.xattn, keyed by the index of the LLM block they precede, so
    GPT-2's names stay one-to-one."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            wpe=nn.Embedding(c.block_size, c.n_embd),
            drop=nn.Dropout(c.dropout),
            h=nn.ModuleList(Block(c.n_embd, c.n_head, c.dropout, c.bias) for _ in range(c.n_layer)),
            ln_f=nn.LayerNorm(c.n_embd, bias=c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.xattn = nn.ModuleDict()
        if c.d_user > 0:
            for i in range(0, c.n_layer, c.xattn_every):
                self.xattn[str(i)] = GatedCrossAttention(
                    c.n_embd, c.d_user, c.xattn_heads or c.n_head, c.xattn_dim or c.n_embd,
                    c.dropout, c.bias, c.gate_init, c.xattn_ffw)
        self.apply(init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))
        if c.lora_rank > 0:  # after the init above, which would overwrite lora_B's zeros
            add_lora(self.transformer.h, c.lora_rank, c.lora_alpha, c.lora_mlp)

    def forward(self, idx, targets=None, user=None, user_mask=None, prefix=None, prefix_mask=None,
                cache=None):
        """idx (B, T) token ids; targets (B, T), -1 = ignored. user (B, M, D) + user_mask (B, M)
        feed the cross-attention; prefix (B, P, C) + prefix_mask (B, P) are prepended to the tokens
        (soft prompt). Masks are bool, True = real. Positions count real slots only, so a padded
        slot shifts no position and is never attended to. cache: a KVCache; the call appends its
        positions and attends to everything cached. Returns (logits (B, T, V) of the token
        positions, loss or None)."""
        B, T = idx.shape
        x = self.transformer.wte(idx)  # (B, T, C)
        new_mask = None  # (B, S) bool for the S positions of this call, None = all real
        if prefix is not None:
            if prefix_mask is None:
                prefix_mask = torch.ones(prefix.shape[:2], dtype=torch.bool, device=idx.device)
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P + T, C)
            text_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            new_mask = torch.cat([prefix_mask, text_mask], dim=1)
        S = x.size(1)
        if cache is not None and new_mask is None:
            new_mask = torch.ones(B, S, dtype=torch.bool, device=idx.device)
        L = 0 if cache is None or cache.key_mask is None else cache.key_mask.size(1)
        if L + S > self.config.block_size:
            raise ValueError(f"sequence of {L + S} positions exceeds "
                             f"block_size={self.config.block_size}")
        if new_mask is None:
            pos = torch.arange(S, device=idx.device)[None]  # (1, S)
        else:  # padding doesn't advance the position
            seen = 0 if L == 0 else cache.n_real[:, None]
            pos = (seen + new_mask.long().cumsum(1) - 1).clamp(min=0)
        key_mask = new_mask
        if cache is not None:
            key_mask = new_mask if L == 0 else torch.cat([cache.key_mask, new_mask], dim=1)
            cache.key_mask, cache.n_real = key_mask, key_mask.sum(1)
        xattn_kv, user_mask = self.user_kv(user, user_mask, cache)
        x = self.transformer.drop(x + self.transformer.wpe(pos))
        x = self.blocks(x, key_mask, xattn_kv, user_mask, None if cache is None else cache.layers)
        logits = self.lm_head(self.transformer.ln_f(x[:, S - T:]))  # (B, T, V): the tokens only
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def blocks(self, x, key_mask, xattn_kv, user_mask, layer_caches=None):
        """The stack: before LLM block i, its gated cross-attention reads the user (when block i has
        one)."""
        for i, block in enumerate(self.transformer.h):
            if str(i) in xattn_kv:
                x = self.xattn[str(i)](x, xattn_kv[str(i)], user_mask)
            x = block(x, key_mask, None if layer_caches is None else layer_caches[i])
        return x

    def user_kv(self, user, user_mask, cache=None):
        """The cross-attention keys/values of every xattn block: projected from `user`, or taken
        from the cache (projected once per sequence). Returns ({layer: (k, v)}, user_mask); no user:
        the plain LLM."""
        if cache is not None and cache.xattn_kv is not None:
            return cache.xattn_kv, cache.user_mask
        if user is None:
            return {}, None
        if not len(self.xattn):
            raise ValueError("user embeddings given, but this GPT has no cross-attention; "
                             "a soft prompt goes in through prefix=")
        kv = {i: blk.attn.project_kv(user) for i, blk in self.xattn.items()}  # (B, M, d_inner) each
        if cache is not None:
            cache.xattn_kv, cache.user_mask = kv, user_mask
        return kv, user_mask

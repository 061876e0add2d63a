"""
The LLM side of User-LLM (paper Sec 3.2, App. B): a GPT-2-architecture language model contextualised by user embeddings.

- `Block` (below) is the one Transformer block of the project, shared by the GPT and the user encoder (encoder.py);
  `attention` is the one attention: self-attention, the gated cross-attention and the Perceiver (perceiver.py) call it.
- `GPT` keeps GPT-2's parameter names, so GPT-2 checkpoints load one-to-one (userllm.load_gpt2).
- Fusion (Sec 3.2.1 / App. B): `GatedCrossAttention` (Flamingo-style, tanh gates at 0) every `xattn_every` layers, or a
  `SoftPrompt` prefix. `LoRALinear` (Sec 3.2.3, strategy "lora") adds low-rank updates that start at zero.
- Decoding with a `KVCache`: `generate` (greedy / sampling), `beam_search` (constrainable: eval.py keeps it to the
  catalogue) and `tree_logits`, which scores a token tree (a chunk of a catalogue's prefix trie) after a cached prompt.

Used through userllm.py (train_llm.py, eval.py, flops.py); tested by `python -m pytest tests/test_model.py`.

Dimension letters: B batch, T token positions, P prefix positions, L cached positions, M user events (or latents),
C channels (n_embd), D the user-embedding width (d_user), nh heads, hs head size, V vocabulary, K beams.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention(q, k, v, n_head, mask=None, is_causal=False, dropout_p=0.0):
    """Multi-head scaled dot-product attention (PyTorch SDPA), the project's one attention.
    q (B, Tq, C), k and v (B, Tk, C) -> (B, Tq, C). mask: (B, Tq or 1, Tk) bool, True = may attend."""
    B, Tq, C = q.shape
    Tk = k.size(1)
    q = q.view(B, Tq, n_head, C // n_head).transpose(1, 2)  # (B, nh, Tq, hs)
    k, v = (t.view(B, Tk, n_head, C // n_head).transpose(1, 2) for t in (k, v))  # (B, nh, Tk, hs)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                       dropout_p=dropout_p, is_causal=is_causal)
    return y.transpose(1, 2).contiguous().view(B, Tq, C)  # (B, Tq, C): re-assemble the heads


def init_weights(module):
    """GPT-2's initialisation, as nanoGPT's: N(0, 0.02) weights, zero biases (model.apply(init_weights))."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with GPT-2 parameter names (c_attn, c_proj). `causal=False` for Bert4Rec."""

    def __init__(self, n_embd, n_head, dropout=0.0, bias=True, causal=True):
        super().__init__()
        assert n_embd % n_head == 0, f"n_embd={n_embd} must be divisible by n_head={n_head}"
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.dropout, self.causal = n_head, dropout, causal

    def forward(self, x, key_mask=None, kv_cache=None):
        # key_mask: (B, L + T) bool, True where the key is real (not padding); None means all real. Or (B, T, L + T):
        # each query's own keys, used as given (token trees, tree_logits below).
        # kv_cache: a LayerKV holding the L earlier positions' keys/values (generation); x are the T new positions.
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, L + T, C)
        L = k.size(1) - T
        mask = None
        if key_mask is not None and key_mask.dim() == 3:
            mask = key_mask
        elif key_mask is not None or L > 0:
            # query t sits at position L + t; it may see key s when s is real and (if causal) s <= L + t ...
            real = torch.ones(B, L + T, dtype=torch.bool, device=x.device) if key_mask is None else key_mask
            mask = real[:, None, :]  # (B, 1, L + T)
            if self.causal:
                mask = mask & torch.ones(T, L + T, dtype=torch.bool, device=x.device).tril(L)
            # ... and always sees itself, so a padding query's softmax row is never empty (no NaN).
            mask = mask | (torch.arange(L + T, device=x.device) == L + torch.arange(T, device=x.device)[:, None])
        y = attention(q, k, v, self.n_head, mask, is_causal=self.causal and mask is None,
                      dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd, dropout=0.0, bias=True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
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


# ----------------------------------------------------------------------------------------------------------------------
# LoRA (Sec 3.2.3, strategy "lora")

class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update (alpha / r) * B A x (Hu et al. 2021). `weight`/`bias` keep their names so GPT-2
    weights load unchanged; B starts at zero, so the layer starts as the plain linear: training starts from the base."""

    def __init__(self, in_features, out_features, bias=True, rank=8, alpha=16.0):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear; any non-zero A works since B is 0
        self.scaling = alpha / rank

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged(self):
        """A plain nn.Linear with the update folded into its weight (for inference)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None).to(self.weight)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scaling * self.lora_B @ self.lora_A)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def add_lora(blocks, rank, alpha, mlp=False):
    """Swap the attention (and optionally MLP) projections of every Block for LoRALinear, keeping their weights."""
    names = [("attn", "c_attn"), ("attn", "c_proj")] + ([("mlp", "c_fc"), ("mlp", "c_proj")] if mlp else [])
    for block in blocks:
        for parent, name in names:
            old = getattr(getattr(block, parent), name)
            new = LoRALinear(old.in_features, old.out_features, old.bias is not None, rank, alpha).to(old.weight)
            new.load_state_dict(old.state_dict(), strict=False)  # weight, bias; lora_A/B keep their init
            setattr(getattr(block, parent), name, new)


# ----------------------------------------------------------------------------------------------------------------------
# Fusion of user embeddings into the LLM (Sec 3.2.1 cross-attention, App. B soft prompt)

class CrossAttention(nn.Module):
    """Queries from x (width d_q), keys/values from a context (width d_kv), attending at an inner width d_inner; the
    output is projected back to d_q. Shared by GatedCrossAttention and the Perceiver resampler."""

    def __init__(self, d_q, d_kv, n_head, d_inner, dropout=0.0, bias=True):
        super().__init__()
        assert d_inner % n_head == 0, f"cross-attention width {d_inner} must be divisible by its {n_head} heads"
        self.q = nn.Linear(d_q, d_inner, bias=bias)
        self.kv = nn.Linear(d_kv, 2 * d_inner, bias=bias)
        self.proj = nn.Linear(d_inner, d_q, bias=bias)
        self.n_head, self.dropout = n_head, dropout

    def project_kv(self, context):
        """context (B, M, d_kv) -> keys, values (B, M, d_inner); computed once per sequence during generation."""
        return self.kv(context).chunk(2, dim=2)

    def forward(self, x, kv, mask=None):
        # x (B, T, d_q); kv from project_kv; mask (B, M) bool True = real. A row without a single real key attends to
        # all of them instead (finite, never NaN); the caller discards that output (GatedCrossAttention does).
        # Or mask (B, T, M) float: added to the attention logits as given (-inf = may not attend; the Perceiver's).
        if mask is not None and mask.dtype == torch.bool:
            mask = (mask | ~mask.any(1, keepdim=True))[:, None, :]  # (B, 1, M)
        y = attention(self.q(x), *kv, self.n_head, mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y)  # (B, T, d_q)


class GatedCrossAttention(nn.Module):
    """Flamingo's gated cross-attention dense block (Sec 3.2.1): text attends to the user embeddings, then an FFW, each
    added through a tanh gate. Flamingo starts the gates at 0 (gate_init), so the untouched model is exactly the plain
    LLM; but behind a zero gate the block gets no gradient, and the gate's sign is left to noise (userllm.DEFAULTS).
    Keys/values are projected from d_user inside the block. A user with no real event gets no update at all."""

    def __init__(self, n_embd, d_user, n_head, d_inner, dropout=0.0, bias=True, gate_init=0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CrossAttention(n_embd, d_user, n_head, d_inner, dropout, bias)
        self.gate_attn = nn.Parameter(torch.full((1,), gate_init))
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)
        self.gate_ff = nn.Parameter(torch.full((1,), gate_init))

    def forward(self, x, kv, user_mask=None):
        # x (B, T, C); kv = self.attn.project_kv(user) for user (B, M, D); user_mask (B, M) bool, True = real event.
        has_user = 1.0 if user_mask is None else user_mask.any(1).to(x.dtype)[:, None, None]  # (B, 1, 1)
        x = x + has_user * torch.tanh(self.gate_attn) * self.attn(self.ln_1(x), kv, user_mask)
        return x + has_user * torch.tanh(self.gate_ff) * self.mlp(self.ln_2(x))


class Recency(nn.Module):
    """A learned embedding of each event's recency, added to the user embeddings before they are attended to:
    attention sees a set, and without it nothing tells the latest event (whose embedding predicts what comes next)
    from the 49 before it. Index k = the number of real events after this one (0 = the latest), so left or right
    padding changes nothing. Starts at std 1, as Flamingo's time embeddings do. Looked up with F.embedding, not
    self.emb[index]: on CPU with more than one thread, the backward of tensor indexing adds the rows' gradients in an
    order that varies from run to run (a run would not repeat bit for bit); embedding's backward does not."""

    def __init__(self, max_events, d):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(max_events, d))

    def forward(self, x, mask):
        # x (B, N, D) user embeddings; mask (B, N) bool, True = real event. Returns x + the recency embedding.
        return x + F.embedding(recency_index(mask).clamp(max=self.emb.size(0) - 1), self.emb)


def recency_index(mask):
    """mask (B, N) bool, True = real event -> (B, N) int64: how many real events come after each one (0 = latest)."""
    return mask.flip(1).cumsum(1).flip(1) - mask.long()


class SoftPrompt(nn.Module):
    """Soft-prompt fusion (App. B): user embeddings projected to the LLM width by a two-layer MLP (Linear-GELU-Linear,
    so the projection can be non-linear as in the paper's projection layers) and a learned task prompt of
    n_task_tokens in front. forward(user (B, M, D), user_mask (B, M)) -> prefix (B, n_task + M, C), prefix_mask."""

    def __init__(self, d_user, n_embd, n_task_tokens):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(d_user, n_embd), nn.GELU(approximate="tanh"), nn.Linear(n_embd, n_embd))
        self.task = nn.Parameter(torch.randn(n_task_tokens, n_embd) * 0.02)

    def forward(self, user, user_mask=None):
        B, M, _ = user.shape
        if user_mask is None:
            user_mask = torch.ones(B, M, dtype=torch.bool, device=user.device)
        task = self.task.expand(B, -1, -1)  # (B, n_task, C)
        prefix = torch.cat([task, self.proj(user)], dim=1)  # (B, n_task + M, C)
        task_mask = torch.ones(B, task.size(1), dtype=torch.bool, device=user.device)
        return prefix, torch.cat([task_mask, user_mask], dim=1)  # (B, n_task + M)


# ----------------------------------------------------------------------------------------------------------------------
# KV cache for generation

class LayerKV:
    """One self-attention layer's keys and values of the positions seen so far, (B, L, C) each, grown every call."""

    def __init__(self):
        self.k = self.v = None

    def update(self, k, v):
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)  # (B, L + T, C)
        self.k, self.v = k, v
        return k, v

    def fork(self):
        """A LayerKV starting from the same keys/values (no copy); what it appends stays its own."""
        out = LayerKV()
        out.k, out.v = self.k, self.v
        return out


class KVCache:
    """What generation keeps between forward calls: each layer's self-attention keys/values, the cross-attention
    keys/values (projected from the user embeddings once per sequence), the key padding mask of every position so far
    and the count of real positions (the next position id)."""

    def __init__(self, n_layer):
        self.layers = [LayerKV() for _ in range(n_layer)]
        self.xattn_kv, self.user_mask = None, None  # {layer: (k, v)}, (B, M)
        self.key_mask, self.n_real = None, None  # (B, L) bool, (B,) long

    def reorder(self, rows):
        """Keep/duplicate batch rows (beam search): every cached tensor becomes tensor[rows]."""
        for layer in self.layers:
            layer.k, layer.v = layer.k[rows], layer.v[rows]
        if self.xattn_kv is not None:
            self.xattn_kv = {i: (k[rows], v[rows]) for i, (k, v) in self.xattn_kv.items()}
        if self.user_mask is not None:
            self.user_mask = self.user_mask[rows]
        self.key_mask, self.n_real = self.key_mask[rows], self.n_real[rows]


def tree_ancestors(parent):
    """parent (T,) long (-1: a root) -> (T, T) bool, [t, s] = s is t or an ancestor of t. One step up the tree per
    iteration for all tokens at once (as many iterations as the tree is deep)."""
    T = parent.numel()
    rows = torch.arange(T, device=parent.device)
    up = torch.cat([torch.where(parent >= 0, parent, T), rows.new_tensor([T])])  # (T + 1,): column T = above a root
    anc = torch.zeros(T, T + 1, dtype=torch.bool, device=parent.device)
    node = rows
    for _ in range(T + 1):  # a token is at most T - 1 steps below its root
        anc[rows, node] = True
        if bool((node == T).all()):
            break
        node = up[node]
    return anc[:, :T]


# ----------------------------------------------------------------------------------------------------------------------
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
    d_user: int = 0  # width of the user embeddings fed to cross-attention (0: no cross-attention)
    xattn_every: int = 1  # a gated cross-attention block before LLM blocks 0, k, 2k, ... (k = xattn_every; d_user > 0)
    xattn_dim: int = 0  # the cross-attention's inner width (0: n_embd); q from n_embd, k/v from d_user, out to n_embd
    xattn_heads: int = 0  # 0: n_head
    gate_init: float = 0.0  # the cross-attention gates' start (before tanh); Flamingo's 0 = exactly the plain LLM
    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float = 16.0
    lora_mlp: bool = False  # also put LoRA on the MLP projections


class GPT(nn.Module):
    """GPT-2 with GPT-2's parameter names (transformer.wte/wpe/h/ln_f, lm_head tied to wte). Cross-attention blocks live
    in self.xattn, keyed by the index of the LLM block they precede, so GPT-2 names stay one-to-one."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            wpe=nn.Embedding(c.block_size, c.n_embd),
            drop=nn.Dropout(c.dropout),
            h=nn.ModuleList([Block(c.n_embd, c.n_head, c.dropout, c.bias) for _ in range(c.n_layer)]),
            ln_f=nn.LayerNorm(c.n_embd, bias=c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.xattn = nn.ModuleDict()
        if c.d_user > 0:
            for i in range(0, c.n_layer, c.xattn_every):
                self.xattn[str(i)] = GatedCrossAttention(c.n_embd, c.d_user, c.xattn_heads or c.n_head,
                                                         c.xattn_dim or c.n_embd, c.dropout, c.bias, c.gate_init)
        self.apply(init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))
        if c.lora_rank > 0:  # after the init above, which would otherwise overwrite lora_B's zeros
            add_lora(self.transformer.h, c.lora_rank, c.lora_alpha, c.lora_mlp)

    def num_params(self, trainable=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable)

    def forward(self, idx, targets=None, user=None, user_mask=None, prefix=None, prefix_mask=None, cache=None):
        """idx (B, T) token ids; targets (B, T), -1 = ignored. user (B, M, D) + user_mask (B, M) feed cross-attention;
        prefix (B, P, C) + prefix_mask (B, P) are prepended to the token embeddings (soft prompt). Masks are bool,
        True = real. Position ids count real slots only: with no padding the prefix takes positions 0..P-1 and the
        tokens P..P+T-1, and a padded slot never shifts anyone's position nor is attended to: it changes no output.
        cache: a KVCache (generation): the call appends its positions to it and attends to everything cached.
        Returns (logits (B, T, V) of the token positions only, loss or None)."""
        B, T = idx.shape
        x = self.transformer.wte(idx)  # (B, T, C)
        new_mask = None  # (B, S) bool for the S positions of this call, None = all real
        if prefix is not None:
            if prefix_mask is None:
                prefix_mask = torch.ones(prefix.shape[:2], dtype=torch.bool, device=idx.device)
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P + T, C)
            new_mask = torch.cat([prefix_mask, torch.ones(B, T, dtype=torch.bool, device=idx.device)], dim=1)
        S = x.size(1)
        if cache is not None and new_mask is None:
            new_mask = torch.ones(B, S, dtype=torch.bool, device=idx.device)
        L = 0 if cache is None or cache.key_mask is None else cache.key_mask.size(1)
        if L + S > self.config.block_size:
            raise ValueError(f"sequence of {L + S} positions exceeds block_size={self.config.block_size}")
        if new_mask is None:
            pos = torch.arange(S, device=idx.device)[None]  # (1, S)
        else:
            seen = 0 if L == 0 else cache.n_real[:, None]
            pos = (seen + new_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, S): padding doesn't advance the position
        key_mask = new_mask
        if cache is not None:
            key_mask = new_mask if L == 0 else torch.cat([cache.key_mask, new_mask], dim=1)  # (B, L + S)
            cache.key_mask, cache.n_real = key_mask, key_mask.sum(1)
        xattn_kv, user_mask = self._user_kv(user, user_mask, cache)
        x = self.transformer.drop(x + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            if str(i) in xattn_kv:
                x = self.xattn[str(i)](x, xattn_kv[str(i)], user_mask)
            x = block(x, key_mask, None if cache is None else cache.layers[i])
        logits = self.lm_head(self.transformer.ln_f(x[:, S - T:]))  # (B, T, V): the token positions only
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _user_kv(self, user, user_mask, cache):
        """Cross-attention keys/values of every xattn block: projected from `user`, or taken from the cache (computed
        once per sequence). Returns ({layer: (k, v)}, user_mask); no user means the plain LLM."""
        if cache is not None and cache.xattn_kv is not None:
            return cache.xattn_kv, cache.user_mask
        if user is None:
            return {}, None
        if not len(self.xattn):
            raise ValueError("user embeddings given but this GPT has no cross-attention (d_user=0); "
                             "a soft prompt goes in through prefix=")
        kv = {i: blk.attn.project_kv(user) for i, blk in self.xattn.items()}  # (B, M, d_inner) each
        if cache is not None:
            cache.xattn_kv, cache.user_mask = kv, user_mask
        return kv, user_mask

    def merge_lora(self):
        """Fold the LoRA updates into the weights (inference): each LoRALinear becomes an nn.Linear, lora_rank 0."""
        for block in self.transformer.h:
            for parent in (block.attn, block.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, LoRALinear):
                        setattr(parent, name, child.merged())
        self.config = replace(self.config, lora_rank=0)


# ----------------------------------------------------------------------------------------------------------------------
# Decoding with the KV cache: greedy/sampled generation, constrained beam search, token trees.
# Call gpt.eval() first: dropout would make cached and uncached passes differ.

@torch.no_grad()
def generate(gpt, idx, max_new_tokens, user=None, user_mask=None, prefix=None, prefix_mask=None,
             temperature=0.0, top_k=None, eos=None):
    """Continue the prompts idx (B, T) by up to max_new_tokens tokens with a KV cache: greedy when temperature == 0,
    else sampling (optionally from the top_k). Returns (B, T + n); a row that emitted eos is filled with eos after
    it, and generation stops once every row has."""
    cache = KVCache(gpt.config.n_layer)
    logits, _ = gpt(idx, user=user, user_mask=user_mask, prefix=prefix, prefix_mask=prefix_mask, cache=cache)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        logits = logits[:, -1, :]  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1)  # (B,)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                logits = logits.masked_fill(logits < kth, -float("inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)[:, 0]  # (B,)
        if eos is not None:
            nxt = torch.where(done, eos, nxt)
            done = done | (nxt == eos)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if step == max_new_tokens - 1 or (eos is not None and done.all()):
            break
        logits, _ = gpt(nxt[:, None], cache=cache)
    return idx

@torch.no_grad()
def beam_search(gpt, idx, beam_size, max_new_tokens, user=None, user_mask=None, prefix=None, prefix_mask=None,
                eos=None, allowed=None):
    """Batched beam search ranked by summed log-probability (no length normalisation), with a KV cache.
    idx (B, T): prompts of equal length (our task prompts are fixed-length; user/prefix padding goes in the masks).
    allowed(rows) -> for each row (the generated-so-far tokens of a live beam) the token ids allowed next (None, for
    the whole answer or one row, = unconstrained); eval.py plugs a catalogue prefix trie in here.
    Every step, each live beam ending with eos (kept as the last token) is a finished candidate, and its best K
    non-eos continuations become the next beams; a prompt stops once its K best finished hypotheses all outscore
    its best live beam (log-probs are <= 0, so no live beam can overtake them). With eos=None, beam_size=1 is
    greedy decoding; with eos it may return a shorter hypothesis that outscores greedy's.
    Returns per prompt a list of (tokens, sum_logprob), best first, beam_size long where possible: live beams cut
    at max_new_tokens compete with the finished ones."""
    B, K = idx.size(0), beam_size
    dev, NEG = idx.device, -float("inf")
    cache = KVCache(gpt.config.n_layer)
    logits, _ = gpt(idx, user=user, user_mask=user_mask, prefix=prefix, prefix_mask=prefix_mask, cache=cache)
    cache.reorder(torch.arange(B, device=dev).repeat_interleave(K))  # (B*K) rows: K beams per prompt
    logits = logits[:, -1].repeat_interleave(K, dim=0)  # (B*K, V)
    scores = [0.0 if k == 0 else NEG for _ in range(B) for k in range(K)]  # one live beam at first: no duplicates
    seqs = [[] for _ in range(B * K)]
    finished, done = [[] for _ in range(B)], [False] * B
    for step in range(max_new_tokens):
        logp = F.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        if allowed is not None:
            logp = logp + allowed_bias(allowed, seqs, scores, logp)
        if eos is not None:  # ending a beam now is a finished candidate; continuing it competes for the K beams
            ends = (torch.tensor(scores, device=dev) + logp[:, eos]).tolist()  # (B*K)
            logp[:, eos] = NEG
        V = logp.size(1)
        cand = (torch.tensor(scores, device=dev)[:, None] + logp).view(B, K * V)  # (B, K*V)
        top, ids = (t.tolist() for t in cand.topk(K, dim=1))  # (B, K)
        rows, toks, scores = [], [], []
        for b in range(B):
            live = []
            if not done[b]:
                if eos is not None:
                    finished[b] += [(seqs[r] + [eos], ends[r]) for r in range(b * K, b * K + K) if ends[r] > NEG]
                    finished[b] = sorted(finished[b], key=lambda h: -h[1])[:K]
                live = [(b * K + i // V, i % V, s) for s, i in zip(top[b], ids[b]) if s > NEG]
                if not live or (len(finished[b]) == K and finished[b][-1][1] >= live[0][2]):
                    done[b], live = True, []
            live += [(b * K, 0, NEG)] * (K - len(live))  # dead placeholder beams keep the shape (B*K)
            for beam, t, s in live:
                rows.append(beam), toks.append(t), scores.append(s)
        seqs = [seqs[r] + [t] for r, t in zip(rows, toks)]
        if all(done) or step == max_new_tokens - 1:
            break
        cache.reorder(torch.tensor(rows, device=dev))
        logits, _ = gpt(torch.tensor(toks, device=dev)[:, None], cache=cache)
        logits = logits[:, -1]  # (B*K, V)
    out = []
    for b in range(B):
        pool = finished[b] + [(seqs[r], scores[r]) for r in range(b * K, b * K + K)
                              if not done[b] and scores[r] > NEG]
        out.append(sorted(pool, key=lambda h: -h[1])[:K])
    return out

def allowed_bias(allowed, seqs, scores, logp):
    """(B*K, V) additive mask: 0 where allowed(...) permits the next token of a live beam, -inf elsewhere."""
    bias = torch.zeros_like(logp)
    live = [r for r, s in enumerate(scores) if s > -float("inf")]
    spec = allowed([seqs[r] for r in live])
    if spec is None:
        return bias
    rows, cols = [], []
    for r, ids in zip(live, spec):
        if ids is not None:
            bias[r] = -float("inf")
            rows += [r] * len(ids)
            cols += list(ids)
    index = torch.tensor([rows, cols], dtype=torch.long, device=logp.device)  # (2, n)
    bias[index[0], index[1]] = 0.0
    return bias

@torch.no_grad()
def tree_logits(gpt, idx, parent, cache):
    """Logits of a token tree that continues every cached sequence, leaving the cache as it was: one prompt's cache
    serves many trees (eval.py scores a catalogue's prefix trie this way, one chunk per call).
    idx (B, T): the tree's tokens, the same tree for every row; parent (T,) long: each token's parent, an earlier
    index, or -1 for a token right after the cached sequence. Token t attends to the cached real positions and to
    its ancestors and itself only, at position n_real + its depth, so its logits are those of one plain forward
    over [cached sequence][the path from its root to t]: shared prefixes are computed once. Returns (B, T, V)."""
    B, T = idx.shape
    anc = tree_ancestors(parent)  # (T, T)
    depth = anc.sum(1) - 1  # (T,): 0 right after the cache
    L, S = cache.key_mask.size(1), int(depth.max()) + 1  # the longest path: S positions after the cache
    if L + S > gpt.config.block_size:
        raise ValueError(f"sequence of {L + S} positions exceeds block_size={gpt.config.block_size}")
    mask = torch.cat([cache.key_mask[:, None, :].expand(B, T, L), anc.expand(B, T, T)], dim=2)  # (B, T, L + T)
    x = gpt.transformer.drop(gpt.transformer.wte(idx) + gpt.transformer.wpe(cache.n_real[:, None] + depth))
    xattn_kv = cache.xattn_kv or {}
    for i, block in enumerate(gpt.transformer.h):
        if str(i) in xattn_kv:
            x = gpt.xattn[str(i)](x, xattn_kv[str(i)], cache.user_mask)
        x = block(x, mask, cache.layers[i].fork())  # a fork: the tree's keys/values are not kept
    return gpt.lm_head(gpt.transformer.ln_f(x))  # (B, T, V)

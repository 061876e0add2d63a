"""
Perceiver resampler (paper Sec 3.2 and its Perceiver experiments; Flamingo's resampler): compresses the N user
embeddings to M learned latents (the paper: 50 -> 16), usable in front of either fusion (cross-attention, soft prompt).

Used by train_llm.py (`perceiver=True`); tested by `python -m pytest tests/test_perceiver.py`.

Dimension letters: B batch, N user events, M latents, D width of the user embeddings.
"""
import torch
import torch.nn as nn

from model import MLP, CrossAttention, Recency


class PerceiverResampler(nn.Module):
    """Learned latents (M, D) cross-attend to [inputs; latents] (padded inputs masked out), then an FFW; pre-LN and
    residual, n_layers times. Each input first gets a learned time embedding by recency (model.Recency), so the
    latents can tell recent events from old ones: attention alone sees a set. The latents start small (std 0.02):
    their LayerNorm makes them 16 different queries anyway, and the output then starts as what they read from the
    user. At Flamingo's std 1 the output starts as the latents themselves (their norm ~11 against ~0.1 read from the
    events), nearly the same for every user, so the gates after it get no signal and never open (measured; at std
    0.02 they did not open within a 600-step run either: README, "The Perceiver").
    The output size M doesn't depend on N, nor on padding."""

    def __init__(self, d, n_latents=16, n_layers=2, n_head=4, dropout=0.0, max_events=512):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, d) * 0.02)
        self.time = Recency(max_events, d)
        self.layers = nn.ModuleList([nn.ModuleDict(dict(
            ln_x=nn.LayerNorm(d), ln_lat=nn.LayerNorm(d), attn=CrossAttention(d, d, n_head, d, dropout),
            ln_ff=nn.LayerNorm(d), mlp=MLP(d, dropout))) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d)

    def forward(self, x, mask=None):
        # x (B, N, D); mask (B, N) bool, True = real event. Returns latents (B, M, D) and their mask (B, M), all True.
        B, N, _ = x.shape
        M = self.latents.size(0)
        lat = self.latents.expand(B, -1, -1)  # (B, M, D)
        if mask is None:
            mask = torch.ones(B, N, dtype=torch.bool, device=x.device)
        x = self.time(x, mask)
        kv_mask = torch.cat([mask, torch.ones(B, M, dtype=torch.bool, device=x.device)], dim=1)  # (B, N + M)
        for layer in self.layers:
            q = layer.ln_lat(lat)
            context = torch.cat([layer.ln_x(x), q], dim=1)  # (B, N + M, D): latents also attend to themselves
            lat = lat + layer.attn(q, layer.attn.project_kv(context), kv_mask)
            lat = lat + layer.mlp(layer.ln_ff(lat))
        return self.ln_f(lat), torch.ones(B, M, dtype=torch.bool, device=x.device)

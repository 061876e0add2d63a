"""
Perceiver resampler (paper Sec 3.2.2 and Table 6; Flamingo's resampler): compresses the N user
embeddings to M learned latents (the paper: 50 -> 16), in front of either fusion (cross-attention or
soft prompt).

    python train_llm.py configs/synthetic_llm.py --perceiver=True

Dimension letters: B batch, N user events, M latents, D width of the user embeddings.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import MLP, CrossAttention, Recency, recency_index

READ_BIAS = 6.0  # at init latent m gives 0.86 of its attention to its event (e^6 against 65 keys)


class PerceiverResampler(nn.Module):
    """Learned latents (M, D) cross-attend to [inputs; latents] (padded inputs masked out), then an
    FFW; pre-LN and residual, n_layers times. Each input first gets a learned embedding of its
    recency (model.Recency): attention alone sees a set. The output size M depends neither on N nor
    on padding. Ours (docs/deviations.md): the resampler starts as "latent m reads the m-th latest
    event": a learned read bias (latent x recency, added to the attention logits) starts at
    READ_BIAS on that event, each layer's value projection starts as the identity, its output
    projection as identity / n_layers and its FFW's last layer at zero, so latent m starts as event
    m itself, normalised; training decides what else to keep."""

    def __init__(self, d, n_latents=16, n_layers=2, n_head=4, dropout=0.0, max_events=512):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, d) * 0.02)
        self.time = Recency(max_events, d)
        self.read_bias = nn.Parameter(torch.zeros(n_latents, max_events))  # (M, recency)
        with torch.no_grad():
            self.read_bias[:, :n_latents].fill_diagonal_(READ_BIAS)
        self.layers = nn.ModuleList([nn.ModuleDict(dict(
            ln_x=nn.LayerNorm(d), ln_lat=nn.LayerNorm(d),
            attn=CrossAttention(d, d, n_head, d, dropout),
            ln_ff=nn.LayerNorm(d), mlp=MLP(d, dropout))) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d)
        with torch.no_grad():  # start as the identity on what each latent reads (docstring)
            for layer in self.layers:
                value = layer.attn.kv.weight[d:]  # (d, d): kv = [keys; values]
                value.copy_(torch.eye(d))
                layer.attn.kv.bias[d:].zero_()
                layer.attn.proj.weight.copy_(torch.eye(d) / n_layers)
                layer.attn.proj.bias.zero_()
                layer.mlp.c_proj.weight.zero_()
                layer.mlp.c_proj.bias.zero_()

    def forward(self, x, mask=None):
        # x (B, N, D); mask (B, N) bool, True = real event. Returns latents (B, M, D), their mask
        # (B, M).
        B, N, _ = x.shape
        M = self.latents.size(0)
        lat = self.latents.expand(B, -1, -1)  # (B, M, D)
        if mask is None:
            mask = torch.ones(B, N, dtype=torch.bool, device=x.device)
        x = self.time(x, mask)
        rec = recency_index(mask).clamp(max=self.read_bias.size(1) - 1)  # (B, N)
        bias = F.embedding(rec, self.read_bias.T).transpose(1, 2)  # (B, M, N); F.embedding: Recency
        bias = bias.masked_fill(~mask[:, None, :], float("-inf"))
        bias = torch.cat([bias, bias.new_zeros(B, M, M)], dim=2)  # (B, M, N + M): none on latents
        for layer in self.layers:
            q = layer.ln_lat(lat)
            context = torch.cat([layer.ln_x(x), q], dim=1)  # (B, N + M, D): latents see themselves
            lat = lat + layer.attn(q, layer.attn.project_kv(context), bias.to(q.dtype))
            lat = lat + layer.mlp(layer.ln_ff(lat))
        return self.ln_f(lat), torch.ones(B, M, dtype=torch.bool, device=x.device)

"""
Faster forms of formulas that the reading path writes plainly, each behind one flag and tested equal
to the plain form (tests/test_fused.py).

- linear_cross_entropy (EncoderConfig.fused_loss, on by default): the encoder's tied next-event
  cross-entropy, F.cross_entropy(x @ w.T (+ b * seen), y), computed a chunk of rows at a time with
  its gradient in the same pass, so that no (K, V) logits tensor is allocated, filled or saved for
  backward (docs/benchmarks.md has what it saves). Without gradients (validation) the plain
  expression is summed over chunks of rows, so a large catalogue's (K, V) logits never exist whole.

Dimension letters: K rows (the positions that have a target), d their width, V the candidates.
"""
import torch
import torch.nn.functional as F


class LinearCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(x @ w.T + b * seen_rows(0, K), y, reduction='sum') for x (K, d), w (V, d), y
    (K,), and optionally seen_rows(i, j) -> (j - i, V) a 0/1 indicator and b () a learned scalar
    (the seen bias); CHUNK rows at a time, the gradients as softmax - one-hot. The (CHUNK, V) logits
    stay in the CPU's cache."""
    CHUNK = 256

    @staticmethod
    def forward(ctx, x, w, y, seen_rows=None, b=None):
        loss, db = x.new_zeros(()), x.new_zeros(())
        dx, dw = torch.empty_like(x), torch.zeros_like(w)
        C = LinearCrossEntropy.CHUNK
        for i in range(0, len(x), C):
            xc, yc = x[i:i + C], y[i:i + C]
            z = xc @ w.T  # (chunk, V)
            if seen_rows is not None:
                seen = seen_rows(i, i + C)
                z += b * seen
            lse = torch.logsumexp(z, 1)
            loss += (lse - z.gather(1, yc[:, None])[:, 0]).sum()
            p = z.sub_(lse[:, None]).exp_()  # softmax, in place
            p[torch.arange(len(yc)), yc] -= 1.0  # d loss / d logits
            torch.mm(p, w, out=dx[i:i + C])
            dw.addmm_(p.T, xc)
            if seen_rows is not None:
                db += (p * seen).sum()
        ctx.save_for_backward(dx, dw, db)
        ctx.has_b = b is not None
        return loss

    @staticmethod
    def backward(ctx, grad):
        dx, dw, db = ctx.saved_tensors
        return grad * dx, grad * dw, None, None, grad * db if ctx.has_b else None


def linear_cross_entropy(x, w, y, seen_rows=None, b=None, rows=4096):
    """Summed cross-entropy of the logits x @ w.T (+ b * seen_rows(0, K)) against y. On the CPU in
    fp32 with gradients: LinearCrossEntropy; with gradients elsewhere (a GPU, CPU bf16 autocast) the
    plain expression; without gradients (validation) the plain expression `rows` rows at a time, so
    that a validation batch of a large catalogue never holds its whole (K, V) logits."""
    if not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        total = x.new_zeros(())
        for i in range(0, len(x), rows):
            seen = None if seen_rows is None else (lambda j, k, i=i: seen_rows(i + j, i + k))
            total = total + plain_cross_entropy(x[i:i + rows], w, y[i:i + rows], seen, b)
        return total
    if x.device.type == "cpu" and x.dtype == w.dtype:
        return LinearCrossEntropy.apply(x, w, y, seen_rows, b)
    return plain_cross_entropy(x, w, y, seen_rows, b)


def plain_cross_entropy(x, w, y, seen_rows=None, b=None):
    z = x @ w.T
    if seen_rows is not None:
        z = z + b * seen_rows(0, len(x))
    return F.cross_entropy(z, y, reduction="sum")

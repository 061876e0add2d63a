"""fused.py: the encoder's fused cross-entropy equals the plain form (loss and every gradient),
through the EncoderConfig.fused_loss flag and kernel by kernel."""
import pytest
import torch
import torch.nn.functional as F

import encoder
import fused
from test_encoder import VOCAB, make


@pytest.mark.parametrize("name", ["ar", "bert4rec", "ar-seen", "bert4rec-seen"])
def test_fused_loss_equals_the_plain_per_feature_cross_entropy(name):
    """fused_loss=True (only the positions with a target, only the real columns, chunked) gives the
    loss and gradients of the plain form the reader meets first (every position's tied logits with
    -inf columns, then masked_cross_entropy). An all-padding row, a feature without targets and a
    zero loss weight included; a changed target does change it. With the seen bias: seen ids with
    padding among them, its own gradient."""
    m = make(name, noise=0.3, loss_weights=(1.0, 0.5, 0.0))
    h = torch.randn(4, 7, 32, requires_grad=True)
    targets = [torch.randint(0, v, (4, 7)) for v in VOCAB]
    targets[0][0], targets[1][3] = 0, 0  # row 0: no item target; row 3: no genre target
    targets[2][:] = 0
    seen = (encoder.seen_ids(torch.randint(0, VOCAB[0], (4, 7)), causal=True)
            if name.endswith("-seen") else None)
    assert m.cfg.fused_loss  # the default
    fast = m.feature_loss(h, targets, seen)
    m.cfg.fused_loss = False
    slow = m.feature_loss(h, targets, seen)
    plain = sum(w * encoder.masked_cross_entropy(m.logits(h, f, seen), targets[f])
                for f, w in enumerate(m.cfg.loss_weights) if w)
    assert torch.equal(slow, plain)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(loss, [h, *m.parameters()], allow_unused=True)
             for loss in (fast, slow)]
    for a, b, p in zip(*grads, [h, *m.parameters()]):
        torch.testing.assert_close(a if a is not None else torch.zeros_like(p),
                                   b if b is not None else torch.zeros_like(p), atol=1e-5,
                                   rtol=1e-5)
    m.cfg.fused_loss = True
    targets[0][1, 2] = targets[0][1, 2] % (VOCAB[0] - 1) + 1
    assert not torch.allclose(m.feature_loss(h, targets, seen), fast)
    assert m.feature_loss(h, [torch.zeros(4, 7, dtype=torch.long)] * 3, seen).item() == 0.0


@pytest.mark.parametrize("seen", [False, True])
def test_linear_cross_entropy_equals_the_plain_expression(monkeypatch, seen):
    """The chunked, fused cross-entropy: the loss and gradients of F.cross_entropy(x @ w.T), over
    chunk boundaries (K = 10 rows, chunks of 4) and for no rows at all; a changed target changes it.
    seen: with a bias b on the columns each row lists (repeats and -1 = none among them), its
    gradient included; the reference built by a loop."""
    monkeypatch.setattr(fused.LinearCrossEntropy, "CHUNK", 4)
    x, w = torch.randn(10, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    y = torch.randint(0, 30, (10,))
    cols, b = ((torch.randint(-1, 30, (10, 6)), torch.tensor(-0.7, requires_grad=True)) if seen
               else (None, None))
    rows = (lambda i, j: encoder.seen_mask(cols[i:j], 30)) if seen else None
    z = x @ w.T
    if seen:
        listed = torch.zeros(10, 30)
        for i, row in enumerate(cols.tolist()):
            for c in row:
                if c >= 0:
                    listed[i, c] = 1.0
        assert 0 < listed.sum() < 60  # repeats and -1 really there
        z = z + b * listed
    fast, slow = (fused.linear_cross_entropy(x, w, y, rows, b),
                  F.cross_entropy(z, y, reduction="sum"))
    torch.testing.assert_close(fast, slow)
    params = [x, w] + ([b] if seen else [])
    for g1, g2 in zip(torch.autograd.grad(2.0 * fast, params),
                      torch.autograd.grad(2.0 * slow, params)):
        torch.testing.assert_close(g1, g2)
    y[7] = (y[7] + 1) % 30
    assert not torch.allclose(fused.linear_cross_entropy(x, w, y, rows, b), fast)
    empty_rows = (lambda i, j: encoder.seen_mask(cols[:0], 30)) if seen else None
    empty = fused.linear_cross_entropy(x[:0], w, y[:0], empty_rows, b)
    assert empty.item() == 0.0 and torch.autograd.grad(empty, w)[0].abs().sum() == 0


@pytest.mark.parametrize("seen", [False, True])
def test_validation_loss_is_summed_in_chunks(seen):
    """Without gradients (validation) the loss is the plain expression over chunks of rows, equal to
    the whole (K, V) at once, the seen rows of each chunk its own."""
    torch.manual_seed(0)
    x, w, y = torch.randn(23, 8), torch.randn(11, 8), torch.randint(0, 11, (23,))
    mask = (torch.rand(23, 11) < 0.3).float()
    rows = (lambda i, j: mask[i:j]) if seen else None
    b = torch.tensor(-2.0) if seen else None
    whole = F.cross_entropy(x @ w.T + (b * mask if seen else 0), y, reduction="sum")
    with torch.no_grad():
        chunked = fused.linear_cross_entropy(x, w, y, rows, b, rows=5)
    torch.testing.assert_close(chunked, whole)
    assert not torch.allclose(fused.linear_cross_entropy(x, w, y.roll(1), rows, b, rows=5), whole)

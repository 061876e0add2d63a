"""Tests for encoder.py (paper Sec 3.1, App. A): shapes, causality, tied weights, padding
invariance, cloze masking, and that each encoder can fit a tiny batch. Random tensors only; CPU.
Run: python -m pytest tests/test_encoder.py -q"""
import dataclasses
import json

import pytest
import torch

import encoder
from config import UserError
from encoder import Bert4Rec, DualEncoder, EncoderConfig, UserEncoder

VOCAB = (31, 6, 6)  # item, genre, rating; id 0 is padding
SMALL = dict(vocab_sizes=VOCAB, feature_dims=(16, 8, 8), n_embd=32, n_layer=2, n_head=4,
             block_size=16)
CLASSES = {"ar": UserEncoder, "bert4rec": Bert4Rec, "dual": DualEncoder}
# 'dual-fav': Dual Encoder with label_task='fav' and 3 user embeddings
ALL = ["ar", "bert4rec", "dual", "dual-fav"]
# with seen_bias=True, the bias set to -1 (+ noise)
SEEN = ["ar-seen", "bert4rec-seen", "dual-seen"]


def make(name, seed=0, noise=0.0, **kw):
    """A small model in eval mode. noise > 0 adds N(0, noise^2) to every parameter: at the GPT-2
    init all logits are near 0, so a loss that wrongly counts an extra position would still read
    log(V) and a test could not see it."""
    torch.manual_seed(seed)
    kind = name.split("-")[0]
    if name == "dual-fav":
        kw = dict(label_task="fav", n_user_embs=3, **kw)
    if name.endswith("-seen"):
        kw = dict(seen_bias=True, **kw)
    m = CLASSES[kind](EncoderConfig(kind=kind, **{**SMALL, **kw})).eval()
    with torch.no_grad():
        if m.seen_bias is not None:
            m.seen_bias.fill_(-1.0)
        for p in m.parameters():
            p += noise * torch.randn_like(p)
    return m


def random_batch(n_real=(6, 4, 2, 1), N=6, seed=0):
    """Left-padded batch: row b has n_real[b] real history events. Item ids are all distinct (every
    prefix unique)."""
    g = torch.Generator().manual_seed(seed)
    B = len(n_real)
    pad = torch.arange(N)[None] < (N - torch.tensor(n_real))[:, None]  # (B, N), True at padding
    items = (torch.randperm(VOCAB[0] - 1, generator=g)[:B * (N + 1)] + 1).view(B, N + 1)
    others = [torch.randint(1, v, (B, N + 1), generator=g) for v in VOCAB[1:]]
    events = [items] + others  # F x (B, N+1)
    hist = tuple(x[:, :N].masked_fill(pad, 0) for x in events)
    target = tuple(x[:, N] for x in events)
    fav = torch.randint(1, VOCAB[1], (B,), generator=g)
    return dict(hist=hist, target=target, fav=fav)


def repad(hist, extra=3, seed=1):
    """More left padding, and garbage in the non-item features of every padding event."""
    g = torch.Generator().manual_seed(seed)
    B = hist[0].shape[0]
    out = [torch.cat([torch.zeros(B, extra, dtype=torch.long), x], dim=1) for x in hist]
    pad = out[0] == 0
    return tuple([out[0]] + [torch.where(pad, torch.randint(1, v, x.shape, generator=g), x)
                             for x, v in zip(out[1:], VOCAB[1:])])


def test_config_roundtrip_and_errors():
    cfg = EncoderConfig(kind="dual", n_user_embs=2, **SMALL)
    # what a checkpoint stores: tuples come back as lists
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert isinstance(d["vocab_sizes"], list)
    assert EncoderConfig(**d) == cfg
    with pytest.raises(UserError, match="one entry per feature"):
        EncoderConfig(vocab_sizes=(10, 5), feature_dims=(8, 8, 8))
    with pytest.raises(UserError, match="kind"):
        EncoderConfig(kind="sasrec")
    with pytest.raises(ValueError, match="bert4rec"):
        # kind='ar' config for a Bert4Rec: a checkpoint would lie about its model
        Bert4Rec(EncoderConfig(**SMALL))
    with pytest.raises(ValueError, match="block_size"):
        make("ar").embed(random_batch(N=20, n_real=(3,))["hist"])


@pytest.mark.parametrize("name", ALL + SEEN)
def test_shapes(name):
    m, b = make(name), random_batch()
    B, N = b["hist"][0].shape
    loss = m.loss(b)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    V = VOCAB[1] if name == "dual-fav" else VOCAB[0]
    assert m.scores(b["hist"]).shape == (B, V)
    emb, mask = m.embed(b["hist"])
    if name.startswith("dual"):
        K = m.cfg.n_user_embs
        assert emb.shape == (B, K, 32) and mask.shape == (B, K) and mask.all()
    else:
        assert emb.shape == (B, N, 32) and torch.equal(mask, b["hist"][0] != 0)
        assert (emb[~mask] == 0).all()  # padding rows carry nothing


@pytest.mark.parametrize("name", ["ar", "bert4rec"])
def test_causality(name):
    """AR: changing event t never changes outputs before t. Bert4Rec: it does (bidirectional)."""
    m, hist = make(name, noise=0.3), random_batch(n_real=(6, 6))["hist"]
    t = 4
    changed = tuple(x.clone() for x in hist)
    for x, v in zip(changed, VOCAB):
        x[:, t] = x[:, t] % (v - 1) + 1  # a different real id
    with torch.no_grad():
        a, _ = m.embed(hist)
        b, _ = m.embed(changed)
    assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-4)  # the change is visible from t on
    if name == "ar":
        torch.testing.assert_close(a[:, :t], b[:, :t])
    else:
        assert not torch.allclose(a[:, :t], b[:, :t], atol=1e-4)


@pytest.mark.parametrize("name", ["ar", "bert4rec"])
def test_tied_weights(name):
    """The output layer of feature f is feature f's input table: one Parameter, and changing it
    changes both uses."""
    m, hist = make(name), random_batch(n_real=(6, 6))["hist"]
    for f, table in enumerate(m.trunk.wte):
        assert sum(p is table.weight for p in m.parameters()) == 1
        # no separate output matrix anywhere outside the input tables
        assert not any(p.shape == table.weight.shape for n, p in m.named_parameters()
                       if not n.startswith("trunk.wte."))
        h = torch.randn(2, 32)
        torch.testing.assert_close(m.logits(h, f)[:, 1:VOCAB[f]],
                                   (m.proj[f](h) @ table.weight.T)[:, 1:VOCAB[f]])
    j = int(hist[0][0, 2])  # an item in the input and a column of the scores
    with torch.no_grad():
        emb0, s0 = m.embed(hist)[0], m.scores(hist)
        m.trunk.wte[0].weight[j] += 0.5  # what a gradient step on that row does
        emb1, s1 = m.embed(hist)[0], m.scores(hist)
    assert not torch.allclose(emb0[0, 2], emb1[0, 2], atol=1e-4)  # input use changed
    assert (s0[:, j] - s1[:, j]).abs().max() > 1e-4  # output use changed
    # ... and a gradient step: the loss's gradient reaches the shared table through both uses.
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = m.trunk.wte[0].weight.detach().clone()
    b = random_batch(n_real=(6, 6))
    m.loss(b).backward()
    seen = set(b["hist"][0].flatten().tolist()) | set(b["target"][0].tolist())
    # never an input: its gradient comes from the output use only
    unseen = min(set(range(1, VOCAB[0])) - seen)
    assert m.trunk.wte[0].weight.grad[unseen].abs().sum() > 0
    opt.step()
    assert not torch.equal(before, m.trunk.wte[0].weight)


@pytest.mark.parametrize("name", ALL + SEEN)
def test_padding_invariance(name):
    """Extra left padding and garbage in padding events change neither scores nor embeddings of real
    events."""
    m, hist = make(name, noise=0.3), random_batch()["hist"]
    more = repad(hist)
    # garbage really there
    assert not torch.equal(more[1][more[0] == 0], torch.zeros_like(more[1][more[0] == 0]))
    with torch.no_grad():
        (e0, k0), (e1, k1) = m.embed(hist), m.embed(more)
        torch.testing.assert_close(m.scores(hist), m.scores(more), atol=1e-5, rtol=1e-5)
    if name.startswith("dual"):
        torch.testing.assert_close(e0, e1, atol=1e-5, rtol=1e-5)
    else:
        N = hist[0].shape[1]
        torch.testing.assert_close(k1[:, -N:], k0)
        torch.testing.assert_close(e1[:, -N:][k0], e0[k0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["ar", "dual", "dual-fav", "ar-seen", "dual-seen"])
def test_loss_ignores_padding(name):
    """Same real events, more padding (row 0 goes from none to some) and garbage in it: same loss. A
    changed real event does change it (the comparison can fail)."""
    m, b = make(name, noise=0.3), random_batch()
    with torch.no_grad():
        base = m.loss(b)
        torch.testing.assert_close(m.loss(b | dict(hist=repad(b["hist"]))), base, atol=1e-5,
                                   rtol=1e-5)
        other = tuple(x.clone() for x in b["hist"])
        other[0][0, -1] = other[0][0, -1] % (VOCAB[0] - 1) + 1
        assert not torch.allclose(m.loss(b | dict(hist=other)), base)


def test_bert4rec_cloze_loss_ignores_padding():
    """The cloze loss of the same masked real events does not depend on padding (masking is random,
    so fix it)."""
    m, b = make("bert4rec", noise=0.3), random_batch()
    seq = [torch.cat([h, t[:, None]], 1) for h, t in zip(b["hist"], b["target"])]
    seq_more = [torch.cat([h, t[:, None]], 1) for h, t in zip(repad(b["hist"]), b["target"])]
    masked = m.cloze_mask(seq[0] != 0)
    masked_more = torch.cat([torch.zeros(len(masked), 3, dtype=torch.bool), masked], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(m.cloze_loss(seq_more, masked_more), m.cloze_loss(seq, masked),
                                   atol=1e-5, rtol=1e-5)


def test_bert4rec_masking():
    """At least one real event per sequence, never padding, about mask_prob of the real events, all
    features at once."""
    m = make("bert4rec")
    torch.manual_seed(0)
    # includes an all-padding row and single-event rows
    n_real = torch.tensor([0, 1, 2, 5, 12] * 200)
    real = torch.arange(12)[None] >= (12 - n_real)[:, None]  # (1000, 12), left padding
    masked = m.cloze_mask(real)
    assert not (masked & ~real).any()
    assert (masked.sum(1)[n_real > 0] >= 1).all() and not masked[n_real == 0].any()
    rate = masked[n_real == 12].float().mean().item()
    assert 0.17 < rate < 0.23, rate  # mask_prob = 0.2 on long sequences
    seq = [torch.randint(1, v, real.shape) for v in VOCAB]
    out = m.mask_events(seq, masked)
    for x, y, v in zip(seq, out, VOCAB):
        assert (y[masked] == v).all() and torch.equal(y[~masked], x[~masked])


@pytest.mark.parametrize("name", ALL + SEEN)
def test_special_columns_are_minus_inf(name):
    m, hist = make(name), random_batch()["hist"]
    with torch.no_grad():
        s = m.scores(hist)
    assert torch.isneginf(s[:, 0]).all() and torch.isfinite(s[:, 1:]).all()
    if name.startswith("bert4rec"):
        assert s.shape[1] == VOCAB[0]  # the [MASK] column is dropped: column i is item i
        h = torch.randn(3, 32)
        for f, v in enumerate(VOCAB):
            # no history: no seen bias
            logits = m.logits(h, f, seen=torch.zeros(3, 1, dtype=torch.long))
            assert logits.shape == (3, v + 1) and torch.isneginf(logits[:, [0, v]]).all()


@pytest.mark.parametrize("name", ALL)
def test_overfits_tiny_batch(name):
    """A few hundred Adam steps fit 4 users: the loss collapses and the true next label ranks first
    for every row. Bert4Rec gets more steps: its random cloze masks make each step see only part of
    the sequence."""
    m, b = make(name), random_batch()
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = m.loss(b).item()
    for _ in range(600 if name == "bert4rec" else 300):
        loss = m.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        label = b["fav"] if name == "dual-fav" else b["target"][0]
        assert torch.equal(m.scores(b["hist"]).argmax(1), label)
        final = m.loss(b).item()
    assert final < 0.1 * first, (first, final)


def test_seen_ids():
    """Causal: position t sees the ids of events 0..t; bidirectional: every event's."""
    items = torch.tensor([[0, 5, 7, 5]])
    assert encoder.seen_ids(items, causal=True)[0].tolist() == [[0, 0, 0, 0], [0, 5, 0, 0],
                                                                [0, 5, 7, 0], [0, 5, 7, 5]]
    assert encoder.seen_ids(items, causal=False)[0].tolist() == [[0, 5, 7, 5]] * 4


@pytest.mark.parametrize("name", SEEN)
def test_seen_bias_moves_exactly_the_seen_items(name):
    """The scores with the seen bias b are the scores without it plus b on each row's history items,
    nothing else."""
    m, hist = make(name, noise=0.3), random_batch()["hist"]
    with torch.no_grad():
        s1 = m.scores(hist)
        b = m.seen_bias.item()
        m.seen_bias.zero_()
        s0 = m.scores(hist)
    expected = torch.zeros_like(s0)
    for r, row in enumerate(hist[0].tolist()):
        expected[r, [i for i in row if i]] = b
    assert b < -0.5 and (expected != 0).any()
    torch.testing.assert_close((s1 - s0)[:, 1:], expected[:, 1:])


@pytest.mark.parametrize("repeat", [False, True])
def test_seen_bias_learns_whether_users_repeat(repeat):
    """Trained from 0 on users who never come back to an item the bias goes below 0; on users whose
    next item is always one of their history's, above: the loss sets it, it is not a mask."""
    m = make("ar-seen")
    with torch.no_grad():
        m.seen_bias.zero_()
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        # distinct ids: no target is in its history
        b = random_batch(n_real=(6, 6, 6, 6), seed=step)
        if repeat:  # the next item is one of the history's
            b["target"][0][:] = b["hist"][0][torch.arange(4),
                                             torch.randint(0, 6, (4,), generator=g)]
        loss = m.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (m.seen_bias.item() > 0.2) if repeat else (m.seen_bias.item() < -0.2), m.seen_bias.item()


def test_dual_encoder_fuses_late():
    """Late fusion (App. A): one Transformer per feature in the user tower, each reading its feature
    alone; the favourite-genre variant reads the items alone (the genres would give its answer
    away); the fusion layers emit n_user_embs embeddings."""
    m = make("dual", noise=0.1)
    assert len(m.towers) == 3 and [len(t.wte) for t in m.towers] == [1, 1, 1]
    b = random_batch()
    hist = list(b["hist"])
    other = hist[:2] + [torch.where(hist[2] > 0, hist[2] % (VOCAB[2] - 1) + 1, 0)]  # other ratings
    with torch.no_grad():
        assert not torch.allclose(m.scores(tuple(hist)), m.scores(tuple(other)))
        fav = make("dual-fav", noise=0.1)
        assert fav.features == (0,) and fav.embed(tuple(hist))[0].shape == (4, 3, 32)
        genres = [hist[0], torch.where(hist[1] > 0, hist[1] % (VOCAB[1] - 1) + 1, 0), hist[2]]
        torch.testing.assert_close(fav.scores(tuple(hist)), fav.scores(tuple(genres)))

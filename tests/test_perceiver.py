"""perceiver.py: output size independent of N, padding invariance, gradients, and use in front of both fusions."""
import torch

from model import GPT, GPTConfig, SoftPrompt
from perceiver import PerceiverResampler

D = 16


def test_output_size_independent_of_n():
    torch.manual_seed(0)
    p = PerceiverResampler(D, n_latents=4, n_layers=2, n_head=4)
    for N in (1, 7, 50):
        lat, mask = p(torch.randn(3, N, D), torch.ones(3, N, dtype=torch.bool))
        assert lat.shape == (3, 4, D) and mask.shape == (3, 4) and mask.all()


def test_padded_inputs_do_not_change_output():
    torch.manual_seed(0)
    p = PerceiverResampler(D, n_latents=4).eval()
    x, mask = torch.randn(3, 6, D), torch.ones(3, 6, dtype=torch.bool)
    mask[1, :3] = False
    mask[2] = False  # a user with no events: finite output (the latents attend to themselves)
    ref, _ = p(x, mask)
    assert torch.isfinite(ref).all()
    junk, off = torch.randn(3, 5, D) * 10, torch.zeros(3, 5, dtype=torch.bool)
    torch.testing.assert_close(p(torch.cat([junk, x], 1), torch.cat([off, mask], 1))[0], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(p(torch.cat([x, junk], 1), torch.cat([mask, off], 1))[0], ref, atol=1e-6, rtol=0)
    x2 = x.clone()
    x2[1, :3] = torch.randn(3, D)  # changing padded features changes nothing ...
    torch.testing.assert_close(p(x2, mask)[0], ref, atol=1e-6, rtol=0)
    x2[1, 4] += torch.randn(D)  # ... changing a real one does
    assert not torch.allclose(p(x2, mask)[0][1], ref[1], atol=1e-4)


def test_gradients_reach_latents_and_inputs():
    torch.manual_seed(0)
    p = PerceiverResampler(D, n_latents=4)
    x = torch.randn(2, 5, D, requires_grad=True)
    lat, _ = p(x)
    lat.pow(2).sum().backward()
    assert p.latents.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_in_front_of_both_fusions():
    torch.manual_seed(0)
    p = PerceiverResampler(D, n_latents=4)
    user, mask = torch.randn(2, 9, D), torch.ones(2, 9, dtype=torch.bool)
    lat, lat_mask = p(user, mask)
    idx = torch.randint(0, 50, (2, 7))
    cfg = dict(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16)
    logits, _ = GPT(GPTConfig(**cfg, d_user=D))(idx, user=lat, user_mask=lat_mask)
    assert logits.shape == (2, 7, 50)
    prefix, prefix_mask = SoftPrompt(D, 16, n_task_tokens=2)(lat, lat_mask)
    logits, _ = GPT(GPTConfig(**cfg))(idx, prefix=prefix, prefix_mask=prefix_mask)
    assert logits.shape == (2, 7, 50) and prefix.shape == (2, 2 + 4, 16)


def test_output_starts_from_the_user_and_order_matters():
    """At init the latents are 16 different queries (after their LayerNorm) and the output depends on the user: with
    latents at Flamingo's std 1 it is nearly the latents themselves, the same for every user (the control), and the
    gates after it get no signal. A time embedding by recency: the same events in another order give other latents."""
    torch.manual_seed(0)
    p = PerceiverResampler(128, n_latents=16, max_events=51)
    q = torch.nn.functional.normalize(p.layers[0].ln_lat(p.latents), dim=-1)
    assert (q @ q.T)[~torch.eye(16, dtype=torch.bool)].abs().mean() < 0.2
    x, mask = torch.randn(64, 50, 128), torch.ones(64, 50, dtype=torch.bool)
    with torch.no_grad():
        assert p(x, mask)[0].std(0).mean() > 0.3  # across users (0.40 measured)
        large = PerceiverResampler(128, n_latents=16, max_events=51)
        large.load_state_dict(p.state_dict())
        large.latents.normal_()  # the control: std 1 (0.04 measured)
        assert large(x, mask)[0].std(0).mean() < 0.1
    x, mask = x[:1, :6], mask[:1, :6].clone()
    mask[0, :2] = False
    swapped = x[:, [0, 1, 2, 4, 3, 5]]  # two real events trade places
    assert not torch.allclose(p(x, mask)[0], p(swapped, mask)[0], atol=1e-3)
    without_time = PerceiverResampler(128, n_latents=16, max_events=51)
    without_time.load_state_dict(p.state_dict())
    without_time.time.emb.data.zero_()  # the control: without it, attention over a set cannot see the order
    torch.testing.assert_close(without_time(x, mask)[0], without_time(swapped, mask)[0], atol=1e-5, rtol=0)

"""decode.py: generation and beam search with the KV cache, the catalogue trie, and exact ranking
through the prompt's KV cache and the chunked prefix trie (tree_logits): equal to a full forward on
prompt + answer, with cross-attention users and with a soft prompt, in memory that does not grow
with the catalogue."""
import math
import random

import pytest
import torch

from decode import (TREE_NODES, Trie, answer_logprobs, beam_search, generate, top_answers,
                    tree_logits, trie_chunks)
from model import GPT, GPTConfig, KVCache, SoftPrompt


D, V, EOT = 8, 61, 60  # user-embedding width, vocabulary, end-of-text in these tests


def tiny(**kw):
    return GPTConfig(**dict(block_size=64, vocab_size=V, n_layer=2, n_head=2, n_embd=16) | kw)


def model_and_context(kind, B=3, M=5):
    """A random GPT and the user context GPT.forward takes: cross-attention (gates open), soft
    prompt or none. Row 1 has two padded events, which must change nothing."""
    torch.manual_seed(0)
    user, mask = torch.randn(B, M, D), torch.ones(B, M, dtype=torch.bool)
    mask[1, :2] = False
    if kind == "xattn":
        model = GPT(tiny(d_user=D)).eval()
        for blk in model.xattn.values():
            blk.gate_attn.data.fill_(1.0), blk.gate_ff.data.fill_(1.0)
        return model, dict(user=user, user_mask=mask)
    model = GPT(tiny()).eval()
    if kind == "none":
        return model, {}
    prefix, prefix_mask = SoftPrompt(D, 16, 2)(user, mask)
    return model, dict(prefix=prefix.detach(), prefix_mask=prefix_mask)



@torch.no_grad()
def brute_force(llm, idx, context, answers):
    """The former answer_logprobs: one full forward over prompt + answer per (example, answer),
    (B*C, P + L - 1)."""
    B, C, P = idx.size(0), len(answers), idx.size(1)
    L = max(len(a) for a in answers)
    ans = torch.full((C, L), EOT, dtype=torch.long)
    tgt = torch.full((C, L), -1, dtype=torch.long)
    for c, a in enumerate(answers):
        ans[c, :len(a)] = tgt[c, :len(a)] = torch.tensor(a)
    # (B*C, P + L - 1)
    inputs = torch.cat([idx.repeat_interleave(C, 0), ans.repeat(B, 1)[:, :-1]], dim=1)
    logits, _ = llm(inputs, **{k: v.repeat_interleave(C, dim=0) for k, v in context.items()})
    logp = torch.log_softmax(logits[:, P - 1:].float(), dim=-1)  # (B*C, L, V): the answer positions
    t = tgt.repeat(B, 1)  # (B*C, L)
    picked = logp.gather(2, t.clamp(min=0)[..., None])[..., 0] * (t >= 0)
    return picked.sum(1).view(B, C)


# shared prefixes of several depths, different lengths, a one-token answer, one answer the prefix of
# another's tokens
ANSWERS = [[5, 6, 7, EOT], [5, 6, 8, EOT], [5, 6, EOT], [5, 9, 9, 9, 9, 1, EOT], [12, EOT], [EOT],
           [5, 6, 7, 3, EOT], [40, 41, 42, 43, 44, 45, 46, 47, EOT], [40, 41, 2, EOT],
           [12, 13, EOT], [7, EOT]]


@pytest.mark.parametrize("kind", ["xattn", "soft_prompt"])
def test_cached_forward_and_generation_equal_uncached(kind):
    model, inputs = model_and_context(kind)
    idx = torch.randint(0, V, (3, 20))
    full = model(idx, **inputs)[0]
    cache = KVCache(model.config.n_layer)
    steps = [model(idx[:, :8], cache=cache, **inputs)[0]]
    steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    out = generate(model, idx[:, :8], 10, **inputs)
    ref = idx[:, :8]
    for _ in range(10):  # uncached greedy: recompute everything for every token
        ref = torch.cat([ref, model(ref, **inputs)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


def sequence_logprob(model, prompt, tokens, inputs):
    """Sum of log p(tokens | prompt) from one uncached forward pass (prompt (1, T))."""
    seq = torch.cat([prompt, torch.tensor([tokens])], 1)
    logp = model(seq, **inputs)[0].log_softmax(-1)[0, prompt.size(1) - 1:-1]  # (n, V)
    return logp.gather(1, torch.tensor(tokens)[:, None]).sum().item()


def row(inputs, b):
    return {k: v[b:b + 1] for k, v in inputs.items()}


@pytest.mark.parametrize("kind", ["xattn", "soft_prompt"])
def test_beam_size_one_is_greedy(kind):
    model, inputs = model_and_context(kind)
    idx = torch.randint(0, V, (3, 6))
    greedy = generate(model, idx, 7, **inputs)[:, 6:]
    beams = beam_search(model, idx, 1, 7, **inputs)
    for b in range(3):
        (tokens, score), = beams[b]
        assert tokens == greedy[b].tolist()
        assert math.isclose(score, sequence_logprob(model, idx[b:b + 1], tokens, row(inputs, b)),
                            abs_tol=1e-4)


def test_beam_search_sorted_and_scores_match_forward():
    model, inputs = model_and_context("xattn")
    idx = torch.randint(0, V, (3, 6))
    # greedy emits it at step 3 of row 0: some beams finish
    eos = generate(model, idx, 3, **inputs)[0, -1].item()
    beams = beam_search(model, idx, 4, 6, eos=eos, **inputs)
    n_finished = 0
    for b in range(3):
        assert len(beams[b]) == 4 and len({tuple(t) for t, _ in beams[b]}) == 4
        scores = [s for _, s in beams[b]]
        assert scores == sorted(scores, reverse=True)
        for tokens, score in beams[b]:
            assert eos not in tokens[:-1]
            n_finished += tokens[-1] == eos
            assert math.isclose(score,
                                sequence_logprob(model, idx[b:b + 1], tokens, row(inputs, b)),
                                abs_tol=1e-4)
    assert n_finished > 0
    # the best hypothesis is at least as likely as greedy's (beam search explores a superset of
    # greedy's path)
    greedy = beam_search(model, idx, 1, 6, eos=eos, **inputs)
    assert all(beams[b][0][1] >= greedy[b][0][1] - 1e-5 for b in range(3))


def test_beam_search_honours_allowed():
    model, inputs = model_and_context("soft_prompt")
    eos = 0
    catalogue = [[7, 8, 9, eos], [7, 3, eos], [11, eos], [12, 13, 14, 15, eos]]

    # a prefix trie over the catalogue, the way eval.py constrains to item titles
    def allowed(rows):
        return [sorted({c[len(r)] for c in catalogue if c[:len(r)] == r}) for r in rows]

    idx = torch.randint(1, V, (3, 6))
    beams = beam_search(model, idx, 3, 8, eos=eos, allowed=allowed, **inputs)
    for b in range(3):
        assert len(beams[b]) == 3 and all(t in catalogue for t, _ in beams[b])
        scores = [s for _, s in beams[b]]
        assert scores == sorted(scores, reverse=True)
        # the exact top 3 of the 4 catalogue items (the catalogue is small enough for beam 4 to
        # score them all)
        exact = sorted((sequence_logprob(model, idx[b:b + 1], c, row(inputs, b))
                        for c in catalogue), reverse=True)
        for s, e in zip(scores, exact[:3]):
            assert math.isclose(s, e, abs_tol=1e-4)
    unconstrained = beam_search(model, idx, 3, 8, eos=eos, **inputs)
    assert any(t not in catalogue for b in unconstrained for t, _ in b)


def test_trie_allows_exactly_the_continuations_of_real_titles():
    trie = Trie([[0], [5, 6, 9], [5, 7, 9], [8, 9]])
    assert sorted(trie.allowed([[]])[0]) == [5, 8] and sorted(trie.allowed([[5]])[0]) == [6, 7]
    assert trie.allowed([[5, 7]]) == [[9]] and trie.ids[(8, 9)] == 3


@pytest.mark.parametrize("kind", ["xattn", "soft_prompt", "none"])
@pytest.mark.parametrize("max_nodes", [1, 4, 128])  # 1 and 4 split shared prefixes between chunks
def test_exact_ranking_equals_brute_force(kind, max_nodes):
    model, context = model_and_context(kind)
    idx = torch.randint(0, EOT, (3, 7))
    chunks = trie_chunks(ANSWERS, max_nodes)
    assert sorted(i for ch in chunks for i in ch.ids.tolist()) == list(range(len(ANSWERS)))
    assert (len(chunks) == 1) == (max_nodes == 128)
    got = answer_logprobs(model, idx, context, ANSWERS, chunks)
    torch.testing.assert_close(got, brute_force(model, idx, context, ANSWERS), atol=1e-5, rtol=1e-5)


def test_tree_logits_are_a_plain_forward_of_each_path_and_leave_the_cache():
    model, context = model_and_context("soft_prompt")
    idx = torch.randint(0, EOT, (3, 4))
    cache = KVCache(model.config.n_layer)
    model(idx, cache=cache, **context)
    before = (cache.key_mask.clone(), cache.n_real.clone(),
              [layer.k.clone() for layer in cache.layers])
    # two roots; 4 has children 5, 7
    tokens, parent = torch.tensor([3, 4, 5, 6, 7]), torch.tensor([-1, 0, 1, -1, 1])
    got = tree_logits(model, tokens.expand(3, -1), parent, cache)  # (3, 5, V)
    for t, path in enumerate([[3], [3, 4], [3, 4, 5], [6], [3, 4, 7]]):
        # (3, V)
        full = model(torch.cat([idx, torch.tensor([path]).expand(3, -1)], 1), **context)[0][:, -1]
        torch.testing.assert_close(got[:, t], full, atol=1e-5, rtol=0)
    assert torch.equal(cache.key_mask, before[0]) and torch.equal(cache.n_real, before[1])
    assert all(torch.equal(layer.k, k) for layer, k in zip(cache.layers, before[2]))


def test_memory_is_bounded_whatever_the_catalogue_size():
    """A MovieLens-20M-sized catalogue (27,000 random titles of 2-8 tokens): every call feeds the
    GPT at most B x TREE_NODES tokens, so its logits stay (B, TREE_NODES, V) however many titles
    there are, and a prefix shared by many titles is fed about once (chunk boundaries add a few
    %)."""
    model, context = model_and_context("xattn", B=2)
    rng = random.Random(0)
    titles = set()
    while len(titles) < 27_000:
        titles.add(tuple(rng.randrange(EOT) for _ in range(rng.randint(1, 7))) + (EOT,))
    answers = [list(t) for t in titles]
    fed = []
    hook = model.transformer.wte.register_forward_hook(
        lambda m, args, out: fed.append(tuple(args[0].shape)))
    idx = torch.randint(0, EOT, (2, 6))
    scores = answer_logprobs(model, idx, context, answers)
    hook.remove()
    assert scores.shape == (2, 27_000) and torch.isfinite(scores).all()
    # the prompt, then chunks
    assert fed[0] == (2, 6) and max(b * t for b, t in fed[1:]) <= 2 * TREE_NODES
    prefixes = {tuple(a[:i]) for a in answers for i in range(1, len(a))}
    assert len(prefixes) <= sum(t for _, t in fed[1:]) <= 1.05 * len(prefixes)
    some = [rng.randrange(len(answers)) for _ in range(5)]
    want = brute_force(model, idx, context, [answers[c] for c in some])
    torch.testing.assert_close(scores[:, some], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["xattn", "soft_prompt", "none"])
@pytest.mark.parametrize("max_rows", [1, 3, 256])  # one prefix a call; a few; all at once
def test_top_answers_are_the_top_of_every_answers_score(kind, max_rows):
    """The best-first search returns the k best answers of the brute-force scores, in order, with
    their scores, whatever the number of prefixes it expands a call; with k at least the catalogue's
    size it returns every answer."""
    model, context = model_and_context(kind)
    idx = torch.randint(0, EOT, (3, 7))
    want = brute_force(model, idx, context, ANSWERS)  # (3, C)
    for k in (1, 4, len(ANSWERS)):
        got = top_answers(model, idx, context, ANSWERS, k=k, max_rows=max_rows)
        for b in range(3):
            order = want[b].argsort(descending=True).tolist()[:k]
            assert [a for a, _ in got[b]][:k] == order
            torch.testing.assert_close(torch.tensor([s for _, s in got[b]][:k]), want[b, order],
                                       atol=1e-5, rtol=1e-5)
    assert sorted(a for a, _ in got[0]) == list(range(len(ANSWERS)))

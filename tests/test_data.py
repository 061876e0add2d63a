"""data.py: leakage-free splits for every user, windows cut from offsets, the favourite genre,
resumable epochs, and the tasks as text: prompts, answers, TextPrompt's history, packed and
mixed-history pretraining rows."""
import os

import numpy as np
import pytest

import data
from config import UserError
from conftest import tiny_llm as tiny
from data import Prompter, get_tokenizer, unique_names
from userllm import build_model, describe


def test_split_invariant_every_user(syn):
    d, N = syn, 50
    val, test = d.targets("val"), d.targets("test")
    assert (np.diff(d.offsets) >= 3).all() and len(val) == len(test) == d.n_users
    held_out = np.r_[val, test]
    for min_history in (1, 5):
        train = d.targets("train", min_history)
        assert not np.isin(train, held_out).any()
        idx, real = d.windows(np.r_[train, val], N)
        assert (not np.isin(idx[real], test).any()
                and not np.isin(idx[:len(train)][real[:len(train)]], held_out).any())
        # brute force: every earlier event with enough history, and only those
        for u in range(d.n_users):
            s, e = d.offsets[u], d.offsets[u + 1]
            assert test[u] == e - 1 and val[u] == e - 2
            assert list(train[(train >= s) & (train < e)]) == list(range(s + min_history, e - 2))


def test_windows_equal_bruteforce(syn):
    d, rng = syn, np.random.default_rng(0)
    t = rng.choice(np.r_[d.targets("train", 0), d.targets("test")], 200, replace=False)
    for N in (7, 50):
        b = d.batch(t, N)
        for k, target in enumerate(t):
            s = d.offsets[np.searchsorted(d.offsets, target, "right") - 1]
            past = list(range(max(s, target - N), target))
            for f in range(3):
                ref = [0] * (N - len(past)) + [int(d.feats[f][j]) for j in past]
                assert b["hist"][f][k].tolist() == ref and b["target"][f][k] == d.feats[f][target]
            g = [int(d.feats[1][j]) for j in past]
            best = max(g.count(x) for x in g) if g else 0
            # tied genre seen last wins
            ref_fav = next((x for x in reversed(g) if g.count(x) == best), 0)
            assert b["fav"][k] == ref_fav


def test_favourite_tie_break():
    g = np.array([[0, 0, 3, 5, 5, 3],   # 3 and 5 tie; 3 was seen last
                  [0, 2, 2, 7, 7, 2],   # 2 is the most frequent
                  [0, 0, 0, 0, 0, 0],   # empty window
                  [4, 6, 6, 4, 1, 1]])  # three-way tie; 1 was seen last
    assert data.favourite(g).tolist() == [3, 2, 0, 1]


def test_batch_targets_resumable_epochs():
    targets = np.arange(100, 197)  # 97 targets: batches straddle epoch ends
    steps = [data.batch_targets(targets, s, 10, seed=5) for s in range(20)]
    stream = np.concatenate(steps)
    # each epoch: no repeats
    assert sorted(stream[:97]) == list(targets) and sorted(stream[97:194]) == list(targets)
    # a function of (seed, step)
    assert (data.batch_targets(targets, 13, 10, seed=5) == steps[13]).all()
    assert not (data.batch_targets(targets, 0, 10, seed=6) == steps[0]).all()


def test_length_grouped_batches():
    """length_groups: a group's batches hold the same examples as batch_targets' for those steps,
    each batch one stretch of lengths (so it pads little), in a seeded order."""
    targets = np.arange(100, 197)
    length = lambda ids: (ids * 7919) % 101  # noqa: E731 -- any length unrelated to the order
    plain = [data.batch_targets(targets, s, 10, seed=5) for s in range(4, 8)]
    grouped = data.length_grouped(targets, 1, 10, 5, 4, length)  # steps 4..7
    assert sorted(np.concatenate(grouped)) == sorted(np.concatenate(plain))
    spans = sorted((length(b).min(), length(b).max()) for b in grouped)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # stretches, no overlap
    assert [length(b).max() for b in grouped] != [length(b).max() for b in plain]
    other_seed = data.length_grouped(targets, 1, 10, 6, 4, length)
    assert not all((a == b).all() for a, b in zip(grouped, other_seed))
    # train_batches: step -> the step's batch, grouped or as batch_targets draws it
    step = data.train_batches(targets, 10, 5, length_groups=4, prompt_lengths=length)
    assert all((step(4 + j) == grouped[j]).all() for j in range(4))
    plain_step = data.train_batches(targets, 10, 5)
    assert all((plain_step(4 + j) == plain[j]).all() for j in range(4))


def test_text_and_reviews(syn):
    d = syn
    t = int(d.targets("test")[0])
    parts = d.history_text(t, 3).split("; ")
    last = f"{d.item_titles[d.feats[0][t - 1]]}, {d.rating_values[d.feats[2][t - 1]]:g}"
    assert len(parts) == 3 and parts[-1] == last
    title = d.item_titles[d.feats[0][t]]
    assert title in d.review(t)


def test_config_rejects_typo():
    with pytest.raises(UserError, match="datset"):
        data.main(["--datset=ml1m"])
    with pytest.raises(UserError, match="unknown dataset"):
        data.main(["--dataset=ml2m"])


def test_prompts_hold_what_they_claim(small):
    tok = get_tokenizer("scratch")
    targets = small.targets("test")[:8]
    p = Prompter(small, tok, "next_item", 3, 512, 64)
    batch = p(small.batch(targets, 10), targets)
    for r, t in enumerate(targets):
        text = tok.decode([x for x in batch["idx"][r].tolist()])
        # the last 3 events, oldest first
        titles = [small.item_titles[small.feats[0][j]] for j in range(t - 3, t)]
        history = text.split("History: ")[1].split("\n")[0]
        ratings = [small.rating_values[small.feats[2][j]] for j in range(t - 3, t)]
        assert history == "; ".join(f"{ti}, {r:g}" for ti, r in zip(titles, ratings))
        # the loss sees the answer and eot only
        answer = [x for x in batch["targets"][r].tolist() if x >= 0]
        assert tok.decode(answer) == " " + p.names[small.feats[0][t]] + "<|endoftext|>"
    fixed = Prompter(small, tok, "next_item", 0, 512, 64).prompts(targets)
    assert len({len(x) for x in fixed}) == 1  # User-LLM's query is the same short text for everyone


def test_packed_pretraining_rows(small):
    """pack_examples: each row is the batch's previous examples, then its own, with targets on every
    answer."""
    tok = get_tokenizer("scratch")
    targets = small.targets("train")[:5]
    plain = Prompter(small, tok, "next_item", 0, 512, 64)(small.batch(targets, 10), targets)
    packed = Prompter(small, tok, "next_item", 0, 512, 64, pack=2)(small.batch(targets, 10),
                                                                   targets)
    texts = [tok.decode([x for x in row.tolist()]).split("<|endoftext|>")[0] + "<|endoftext|>"
             for row in plain["idx"]]  # each example alone: query, title, eot
    answers = [[x for x in row.tolist() if x >= 0] for row in plain["targets"]]
    for r in range(5):
        # two earlier examples of the batch, wrapping around, then its own
        mine = [(r - 2) % 5, (r - 1) % 5, r]
        row = packed["idx"][r].tolist()
        assert tok.decode(row).startswith("".join(texts[j] for j in mine)[:-len("<|endoftext|>")])
        assert ([x for x in packed["targets"][r].tolist() if x >= 0]
                == sum((answers[j] for j in mine), []))
    query = tok.encode_ordinary(data.QUERY["next_item"])
    # the first example still starts at position 0
    assert packed["idx"][0, :len(query)].tolist() == query
    with pytest.raises(UserError, match="pack_examples=1 needs fusion='none'"):
        build_model(tiny(pack_examples=1, fusion="xattn"), small, tok)


def test_mixed_history_pretraining_prompts(small):
    """mixed_history: each example writes out 0..K of its own user's last events (a function of the
    example), then the query; the answer is unchanged."""
    tok = get_tokenizer("scratch")
    targets = small.targets("train")[:40]
    plain = Prompter(small, tok, "next_item", 0, 512, 64)
    mixed = Prompter(small, tok, "next_item", 0, 512, 64, mixed=3)
    query = data.QUERY["next_item"]
    lengths = set()
    for t, p in zip(targets, mixed.prompts(targets)):
        k = int(t) % 4
        expected = f"History: {small.history_text(t, k)}\n{query}" if k else query
        assert tok.decode(p) == expected
        lengths.add(k if small.history_text(t, k) else 0)
    assert lengths == {0, 1, 2, 3}  # every history length occurs, none at all included
    # the same example, the same prompt (resumable)
    assert mixed.prompts(targets) == mixed.prompts(targets)
    a, b = plain(small.batch(targets, 10), targets), mixed(small.batch(targets, 10), targets)
    assert [[x for x in r if x >= 0] for r in a["targets"].tolist()] == \
        [[x for x in r if x >= 0] for r in b["targets"].tolist()]
    with pytest.raises(UserError, match="mixed_history=2 needs fusion='none' and text_events=0"):
        build_model(tiny(mixed_history=2, fusion="none", text_events=10), small, tok)
    # results tables keep the two stand-ins apart (eval.py --summary groups runs by this name)
    assert describe(tiny(fusion="none")) != describe(tiny(fusion="none", mixed_history=2))


def test_fav_and_review_answers(small):
    tok = get_tokenizer("scratch")
    targets = small.targets("val")[:4]
    b = small.batch(targets, 10)
    fav = Prompter(small, tok, "fav", 0, 512, 64).answer_tokens(targets, b)
    assert [tok.decode(a[:-1]) for a in fav] == [" " + small.genre_names[g]
                                                 for g in b["fav"].tolist()]
    review = Prompter(small, tok, "review_gen", 0, 512, 8)
    # truncated to max_answer_tokens + eot
    assert all(len(a) <= 9 for a in review.answer_tokens(targets, b))
    assert (small.item_titles[small.feats[0][targets[0]]]
            in tok.decode(review.prompts(targets[:1])[0]))


def test_gpt2_tokenizer_offline():
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("../shared/tiktoken is absent")
    tok = get_tokenizer("gpt2")
    assert tok.n_vocab == 50257 and tok.encode_ordinary("Hello world") == [15496, 995]


def test_unique_names_disambiguates():
    assert unique_names(["<pad>", "Heat", "Up", "Heat"]) == ["<pad>", "Heat [1]", "Up", "Heat [3]"]

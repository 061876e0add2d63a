"""train_llm.py: prompts, strategies (Sec 3.2.3), the composition, the LLM metrics of eval.py, and learning on the
synthetic default (User-LLM beats the same LLM without user context)."""
import json
import math
import os

import numpy as np
import pytest
import torch

import common
import data
import eval as evaluation
import train_llm
import userllm
from common import configure, to_device
from data import Prompter, get_tokenizer, unique_names
from userllm import DEFAULTS, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    return data.UserData(data.prepare(data.config(n_users=200, n_items=80, n_genres=5, raw_dir=str(tmp / "raw"),
                                                  out_dir=str(tmp / "prep"))))


def tiny(**kw):
    args = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--enc_n_embd=16", "--enc_n_layer=1", "--enc_n_head=2",
            "--enc_feature_dims=(8, 4, 4)", "--seq_len=10", "--n_latents=4", "--lora_rank=2"]
    return configure(DEFAULTS, args + [f"--{k}={v}" for k, v in kw.items()])


def count(module):
    return sum(p.numel() for p in module.parameters())


def trained(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("fusion", ["xattn", "soft_prompt"])
def test_each_strategy_trains_exactly_its_parameters(small, fusion):
    tok = get_tokenizer("scratch")
    for perceiver in (False, True):
        counts = {}
        for strategy in ("full", "lora", "enc", "proj"):
            m = build_model(tiny(fusion=fusion, strategy=strategy, perceiver=perceiver), small, tok)
            fusion_layers = count(m.llm.xattn) + (count(m.soft_prompt) if m.soft_prompt else 0) + \
                (count(m.perceiver) if m.perceiver else 0) + (count(m.recency) if m.recency else 0)
            assert (m.recency is not None) == (fusion == "xattn" and not perceiver)  # the Perceiver has its own
            lora = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
            heads = count(m.encoder.proj)  # the encoder's pretraining heads: the LLM's loss never reaches them
            counts[strategy] = trained(m)
            assert trained(m) == {"full": count(m) - heads, "lora": lora + count(m.encoder) - heads + fusion_layers,
                                  "enc": count(m.encoder) - heads + fusion_layers, "proj": fusion_layers}[strategy]
            assert (lora > 0) == (strategy == "lora")
            # DDP's condition: every trained parameter gets a gradient from the loss (a LoRA B starts at 0, so
            # its A's gradient is 0 at first, but it is there)
            targets = small.targets("train")[:4]
            batch = to_device(Prompter(small, tok, "next_item", 0, 64, 16)(small.batch(targets, 10), targets), "cpu")
            m.train()(batch).backward()
            assert not [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        assert counts["full"] > counts["enc"] > counts["proj"] > 0 and counts["lora"] > counts["enc"]


def test_textprompt_has_no_user_layers_and_refuses_enc(small):
    tok = get_tokenizer("scratch")
    m = build_model(tiny(fusion="none", strategy="full", text_events=5, encoder_ckpt="missing.pt"), small, tok)
    assert len(m.llm.xattn) == 0 and m.soft_prompt is None and m.perceiver is None and m.encoder is None
    assert trained(m) == count(m) == count(m.llm)
    with pytest.raises(SystemExit, match="fusion='none'"):
        build_model(tiny(fusion="none", strategy="enc"), small, tok)


@pytest.mark.parametrize("strategy", ["full", "lora", "enc", "proj"])
def test_user_llm_starts_from_a_trained_gpt(small, strategy, tmp_path):
    """llm_ckpt: the GPT of a run without user context becomes the 'pretrained LLM' of a User-LLM run. With its gates at
    0 (and LoRA's B at 0) the new model computes exactly what that GPT does; a checkpoint of another GPT is an error."""
    torch.manual_seed(0)  # a fixed initialisation: the negative control below must not depend on luck
    tok, targets, data = get_tokenizer("scratch"), small.targets("test")[:8], small.fingerprint()
    plain = build_model(tiny(fusion="none", strategy="full"), small, tok)
    torch.save({"model": plain.state_dict(), "data": data}, tmp_path / "plain.pt")
    user = build_model(tiny(strategy=strategy), small, tok)
    userllm.load_llm(user, str(tmp_path / "plain.pt"), small)
    batch = to_device(Prompter(small, tok, "next_item", 0, 512, 64)(small.batch(targets, 10), targets), "cpu")
    with torch.no_grad():
        assert torch.allclose(user(batch), plain(batch), atol=1e-6)
        for gate in user.llm.xattn.values():  # the user now matters, and the GPT weights are the plain run's
            gate.gate_attn.fill_(1.0)
            gate.gate_ff.fill_(1.0)
        logits = lambda m: m.llm(batch["idx"], **m.context(batch["hist"]))[0]
        assert (logits(user) - logits(plain)).abs().max() > 1e-2
    assert torch.equal(user.llm.transformer.wte.weight, plain.llm.transformer.wte.weight)
    other = build_model(tiny(fusion="none", strategy="full", n_embd=48), small, tok)
    torch.save({"model": other.state_dict(), "data": data}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="does not fit this model"):
        userllm.load_llm(user, str(tmp_path / "other.pt"), small)
    part = {k: v for k, v in plain.state_dict().items() if "h.1." not in k}
    torch.save({"model": part, "data": data}, tmp_path / "part.pt")
    with pytest.raises(SystemExit, match="does not hold this model's GPT"):
        userllm.load_llm(user, str(tmp_path / "part.pt"), small)
    lora = build_model(tiny(fusion="none", strategy="lora"), small, tok)
    torch.save({"model": lora.state_dict(), "data": data}, tmp_path / "lora.pt")
    if strategy != "lora":  # a LoRA run's adapters are never dropped silently
        with pytest.raises(SystemExit, match="no place for, e.g. .*lora_"):
            userllm.load_llm(user, str(tmp_path / "lora.pt"), small)
    other_data = {**data, "vocab_sizes": [500, 9, 11], "sha256": "0" * 16, "path": "/elsewhere"}
    torch.save({"model": plain.state_dict(), "data": other_data}, tmp_path / "foreign.pt")
    with pytest.raises(SystemExit, match="foreign.pt was trained on /elsewhere .*500/9/11.*, not on .*prep"):
        userllm.load_llm(user, str(tmp_path / "foreign.pt"), small)


def test_gates_are_logged_and_fusion_layers_get_their_learning_rate(small, tmp_path):
    """log.jsonl carries tanh of every gate (what the progress bar shows), equal to the trained model's; the fusion
    layers train at fusion_lr_mult x lr and the gates at gate_lr_mult x that; a Perceiver at perceiver_lr_mult x lr."""
    args = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--enc_n_embd=16", "--enc_n_layer=1", "--enc_n_head=2",
            "--enc_feature_dims=(8, 4, 4)", "--seq_len=10", f"--data_dir={small.path}", "--strategy=full",
            "--batch_size=8", "--max_steps=3", "--eval_interval=3", "--eval_examples=8", "--log_interval=1",
            "--warmup_steps=0", "--lr=1e-3", "--min_lr=1e-3", "--fusion_lr_mult=10", "--gate_lr_mult=3",
            f"--out_dir={tmp_path}"]
    train_llm.main(args)
    with open(tmp_path / "log.jsonl") as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3]
    model = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    for i in (0, 1):
        assert abs(rows[0][f"attn{i}"]) > 0  # the first step moves every gate off 0
        assert rows[-1][f"attn{i}"] == pytest.approx(torch.tanh(model[f"llm.xattn.{i}.gate_attn"]).item())
        assert rows[-1][f"ff{i}"] == pytest.approx(torch.tanh(model[f"llm.xattn.{i}.gate_ff"]).item())
    cfg = configure(DEFAULTS, args)
    mult = train_llm.fusion_lr_mult(cfg)
    opt = common.adamw(build_model(cfg, small, get_tokenizer("scratch")), 1.0, 0.1, lr_mult=mult)
    lrs = {g["lr_mult"]: len(g["params"]) for g in opt.param_groups}
    assert set(lrs) == {1.0, 10.0, 30.0} and lrs[30.0] == 4  # 2 blocks x 2 gates
    cfg = configure(DEFAULTS, args + ["--perceiver=True", "--perceiver_lr_mult=2"])
    model = build_model(cfg, small, get_tokenizer("scratch"))
    opt = common.adamw(model, 1.0, 0.1, lr_mult=train_llm.fusion_lr_mult(cfg))
    in_group = {id(p): g["lr_mult"] for g in opt.param_groups for p in g["params"]}
    assert {in_group[id(p)] for p in model.perceiver.parameters()} == {2.0}


def test_prompts_hold_what_they_claim(small):
    tok = get_tokenizer("scratch")
    targets = small.targets("test")[:8]
    p = Prompter(small, tok, "next_item", 3, 512, 64)
    batch = p(small.batch(targets, 10), targets)
    for r, t in enumerate(targets):
        text = tok.decode([x for x in batch["idx"][r].tolist()])
        titles = [small.item_titles[small.feats[0][j]] for j in range(t - 3, t)]  # the last 3 events, oldest first
        history = text.split("History: ")[1].split("\n")[0]
        ratings = [small.rating_values[small.feats[2][j]] for j in range(t - 3, t)]
        assert history == "; ".join(f"{ti}, {r:g}" for ti, r in zip(titles, ratings))
        answer = [x for x in batch["targets"][r].tolist() if x >= 0]  # the loss sees the answer and eot only
        assert tok.decode(answer) == " " + p.names[small.feats[0][t]] + "<|endoftext|>"
    fixed = Prompter(small, tok, "next_item", 0, 512, 64).prompts(targets)
    assert len({len(x) for x in fixed}) == 1  # User-LLM's query is the same short text for everyone


def test_packed_pretraining_rows(small):
    """pack_examples: each row is the batch's previous examples, then its own, with targets on every answer."""
    tok = get_tokenizer("scratch")
    targets = small.targets("train")[:5]
    plain = Prompter(small, tok, "next_item", 0, 512, 64)(small.batch(targets, 10), targets)
    packed = Prompter(small, tok, "next_item", 0, 512, 64, pack=2)(small.batch(targets, 10), targets)
    texts = [tok.decode([x for x in row.tolist()]).split("<|endoftext|>")[0] + "<|endoftext|>"
             for row in plain["idx"]]  # each example alone: query, title, eot
    answers = [[x for x in row.tolist() if x >= 0] for row in plain["targets"]]
    for r in range(5):
        mine = [(r - 2) % 5, (r - 1) % 5, r]  # two earlier examples of the batch, wrapping around, then its own
        row = packed["idx"][r].tolist()
        assert tok.decode(row).startswith("".join(texts[j] for j in mine)[:-len("<|endoftext|>")])
        assert [x for x in packed["targets"][r].tolist() if x >= 0] == sum((answers[j] for j in mine), [])
    query = tok.encode_ordinary(data.QUERY["next_item"])
    assert packed["idx"][0, :len(query)].tolist() == query  # the first example still starts at position 0
    with pytest.raises(SystemExit, match="pack_examples=1 needs fusion='none'"):
        build_model(tiny(pack_examples=1, fusion="xattn"), small, tok)


def test_mixed_history_pretraining_prompts(small):
    """mixed_history: each example writes out 0..K of its own user's last events (a function of the example), then
    the query; the answer is unchanged."""
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
    assert mixed.prompts(targets) == mixed.prompts(targets)  # the same example, the same prompt (resumable)
    a, b = plain(small.batch(targets, 10), targets), mixed(small.batch(targets, 10), targets)
    assert [[x for x in r if x >= 0] for r in a["targets"].tolist()] == \
        [[x for x in r if x >= 0] for r in b["targets"].tolist()]
    with pytest.raises(SystemExit, match="mixed_history=2 needs fusion='none' and text_events=0"):
        build_model(tiny(mixed_history=2, fusion="none", text_events=10), small, tok)
    # results tables keep the two stand-ins apart (eval.py --summary groups runs by this name)
    assert evaluation.describe(tiny(fusion="none")) != evaluation.describe(tiny(fusion="none", mixed_history=2))


def test_fav_and_review_answers(small):
    tok = get_tokenizer("scratch")
    targets = small.targets("val")[:4]
    b = small.batch(targets, 10)
    fav = Prompter(small, tok, "fav", 0, 512, 64).answer_tokens(targets, b)
    assert [tok.decode(a[:-1]) for a in fav] == [" " + small.genre_names[g] for g in b["fav"].tolist()]
    review = Prompter(small, tok, "review_gen", 0, 512, 8)
    assert all(len(a) <= 9 for a in review.answer_tokens(targets, b))  # truncated to max_answer_tokens + eot
    assert small.item_titles[small.feats[0][targets[0]]] in tok.decode(review.prompts(targets[:1])[0])


def test_gpt2_tokenizer_offline():
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("../shared/tiktoken is absent")
    tok = get_tokenizer("gpt2")
    assert tok.n_vocab == 50257 and tok.encode_ordinary("Hello world") == [15496, 995]


def test_unique_names_disambiguates():
    assert unique_names(["<pad>", "Heat", "Up", "Heat"]) == ["<pad>", "Heat [1]", "Up", "Heat [3]"]


def test_trie_and_exact_logprobs(small):
    """The catalogue trie allows exactly the continuations of real titles, and answer_logprobs equals a plain sum."""
    trie = evaluation.Trie([[0], [5, 6, 9], [5, 7, 9], [8, 9]])
    assert sorted(trie.allowed([[]])[0]) == [5, 8] and sorted(trie.allowed([[5]])[0]) == [6, 7]
    assert trie.allowed([[5, 7]]) == [[9]] and trie.ids[(8, 9)] == 3
    torch.manual_seed(0)
    tok = get_tokenizer("scratch")
    m = build_model(tiny(), small, tok).eval()
    idx = torch.randint(0, 256, (2, 5))
    answers = [[65, 66, 256], [67, 256]]
    got = evaluation.answer_logprobs(m.llm, idx, {}, answers)
    for b in range(2):
        for c, a in enumerate(answers):
            seq = torch.cat([idx[b], torch.tensor(a)])[None]
            logp = torch.log_softmax(m.llm(seq)[0][0], -1)
            want = sum(logp[5 - 1 + i, t] for i, t in enumerate(a))
            assert got[b, c].item() == pytest.approx(want.item(), abs=1e-4)


def test_average_ranks_share_ties():
    assert evaluation.average_ranks(np.array([5.0, 1.0, 5.0, 3.0, 5.0])).tolist() == [3.0, 0.0, 3.0, 1.0, 3.0]


def test_catalogue_fit_of_a_gpt_without_context(small, tmp_path, monkeypatch):
    """eval.py --catalogue=True: the probability the titles hold after the query equals a brute-force sum over the
    catalogue; a GPT whose title log-probabilities follow the training counts scores Spearman 1 and 10 of 10, and its
    one list's Recall on every test user is most popular's; a model with user context is refused in one line; a
    checkpoint older than a config key still loads."""
    import dataclasses
    torch.manual_seed(0)
    tok, cfg = get_tokenizer("scratch"), tiny(fusion="none", strategy="full")
    m = build_model(cfg, small, tok).eval()
    old = {k: v for k, v in vars(cfg).items() if k != "pack_examples"}  # written before that option existed
    ckpt = {"model": m.state_dict(), "data": small.fingerprint(), "config": old, "encoder_config": None,
            "llm_config": dataclasses.asdict(m.llm.config)}
    torch.save(ckpt, tmp_path / "gpt.pt")
    catalogue = [f"--ckpt={tmp_path / 'gpt.pt'}", "--catalogue=True"]
    fit = evaluation.main(catalogue)
    p = Prompter(small, tok, "next_item", 0, 512, 64)
    prompt = p.prompts(small.targets("train")[:1])[0]
    mass = 0.0
    with torch.no_grad():
        for a in p.answers[1:]:
            logp = torch.log_softmax(m.llm(torch.tensor([prompt + a]))[0][0], -1)
            mass += math.exp(sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(a)))
    assert fit["catalogue mass"] == pytest.approx(mass, rel=1e-4) and 0 < mass < 1
    counts = torch.tensor(data.popularity(small)[1:])
    monkeypatch.setattr(evaluation, "answer_logprobs", lambda *a, **k: torch.log(counts + 1)[None])
    fit = evaluation.main(catalogue)
    assert fit["spearman vs counts"] == pytest.approx(1.0) and fit["top-10 overlap"] == 10
    # ranked as most popular ranks, its one list scores what most popular scores, on every test user
    assert fit["examples"] == len(small.targets("test")) and fit["rows"]["its one list"] == fit["rows"]["most popular"]
    monkeypatch.setattr(evaluation, "answer_logprobs", lambda *a, **k: -torch.log(counts + 1)[None])
    fit = evaluation.main(catalogue + ["--split=val"])  # the least watched first: worse than most popular
    assert fit["rows"]["its one list"]["recall@10"] < fit["rows"]["most popular"]["recall@10"]
    user = build_model(tiny(), small, tok)
    torch.save({**ckpt, "model": user.state_dict(), "config": vars(tiny())}, tmp_path / "user.pt")
    with pytest.raises(SystemExit, match="needs an LLM trained without user context.*is task next_item, fusion xattn"):
        evaluation.main([f"--ckpt={tmp_path / 'user.pt'}", "--catalogue=True"])
    torch.save({"model": {}, "config": {"kind": "ar"}, "encoder_config": {}}, tmp_path / "enc.pt")
    with pytest.raises(SystemExit, match="enc.pt is an encoder"):
        evaluation.main([f"--ckpt={tmp_path / 'enc.pt'}", "--catalogue=True"])


def test_ranking_metrics_against_brute_force():
    torch.manual_seed(0)
    scores = torch.randn(50, 30)
    scores[:, 0] = -float("inf")
    target = torch.randint(1, 30, (50,))
    m = evaluation.ranking_metrics(scores, target)
    ranks = [(scores[b] > scores[b, target[b]]).sum().item() for b in range(50)]
    assert m["recall@5"] == pytest.approx(np.mean([r < 5 for r in ranks]))
    assert m["ndcg@10"] == pytest.approx(np.mean([1 / np.log2(r + 2) if r < 10 else 0 for r in ranks]))
    flat = evaluation.ranking_metrics(torch.zeros(4, 10), torch.tensor([1, 2, 3, 4]))
    assert flat["recall@5"] == 0.0  # ties count against the target: a constant scorer gets no credit


@pytest.mark.slow
def test_user_llm_beats_the_llm_without_user_context(synthetic, pretrained_encoder, tmp_path):
    """The quickstart's pipeline, shorter, one seed: a GPT pretrained without user context (the stand-in LLM, and the
    no-context baseline) is contextualized with the pretrained encoder by configs/synthetic_llm.py's recipe. Exact
    Recall@10 on 300 test users must be at least 2x the GPT's (the bar the full pipeline meets on every seed, README),
    and a cross-attention gate must have opened to 3x its start (tanh 0.01). Measured, 300 + 300 steps on two quiet
    threads: 0.247 against 0.067, gate 0.043 (the stand-in's earlier schedule: 0.233 against 0.063, gate 0.050; with the
    gates started at 0 it was 0.083 against 0.063, gate 0.021)."""
    data = f"--data_dir={synthetic}"
    short = ["--max_steps=300", "--eval_interval=300", "--eval_examples=200"]
    train_llm.main([os.path.join(ROOT, "configs/synthetic_gpt.py"), data, f"--out_dir={tmp_path / 'gpt'}", *short])
    train_llm.main([os.path.join(ROOT, "configs/synthetic_llm.py"), data, f"--out_dir={tmp_path / 'user'}",
                    f"--encoder_ckpt={pretrained_encoder / 'best.pt'}", f"--llm_ckpt={tmp_path / 'gpt' / 'best.pt'}",
                    *short])
    args = [data, "--max_examples=300", "--beam=0"]
    user = next(iter(evaluation.main([f"--ckpt={tmp_path / 'user' / 'best.pt'}", *args]).values()))  # the model's row
    none = next(iter(evaluation.main([f"--ckpt={tmp_path / 'gpt' / 'best.pt'}", *args]).values()))
    with open(tmp_path / "user" / "log.jsonl") as f:
        gates = [json.loads(line) for line in f if '"loss"' in line][-1]
    opened = max(abs(v) for k, v in gates.items() if k[:-1] in ("attn", "ff"))
    print(f"User-LLM recall@10 {user['recall@10']:.4f}, no user context {none['recall@10']:.4f}, gate {opened:.3f}")
    assert user["recall@10"] >= 2 * none["recall@10"], (user, none)
    assert opened > 0.03, gates


def test_dual_encoder_cross_attention(small):
    """DualEnc-Xatten (Table 5): the LLM cross-attends to the Dual Encoder's K user embeddings instead of N events."""
    tok = get_tokenizer("scratch")
    enc = dict(vocab_sizes=small.vocab_sizes, feature_dims=(8, 4, 4), n_embd=16, n_layer=1, n_head=2, block_size=11,
               kind="dual", n_user_embs=3)
    m = build_model(tiny(strategy="enc"), small, tok, enc_cfg=enc)
    targets = small.targets("val")[:4]
    batch = to_device(Prompter(small, tok, "next_item", 0, 512, 64)(small.batch(targets, 10), targets), "cpu")
    assert m.context(batch["hist"])["user"].shape == (4, 3, 16)
    loss = m(batch)
    loss.backward()
    assert torch.isfinite(loss) and m.encoder.user_proj.weight.grad is not None


def test_results_table_shows_every_rows_metrics(capsys):
    """A model's row may hold metrics the reference rows lack (beam_recall@k): every row's metrics are printed."""
    evaluation.print_table({"User-LLM": {"beam_recall@10": 0.25}, "most popular": {"recall@10": 0.0625}})
    header, model, popular = capsys.readouterr().out.splitlines()
    assert header.split() == ["beam_recall@10", "recall@10"]
    assert model.split() == ["User-LLM", "0.2500"] and popular.split() == ["most", "popular", "0.0625"]


@pytest.mark.parametrize("module", ["recency", "perceiver"])
def test_event_lookups_repeat_bit_for_bit_on_two_threads(module):
    """The gradient through the per-event lookups (model.Recency; the Perceiver's time embedding and read bias) is
    the same in every run on 2 threads (the quickstart's machine), so a seeded run repeats. Through tensor indexing,
    whose backward on CPU adds duplicate rows in a thread-dependent order, it was not: at the quickstart's shape
    (64 users x 50 events, 64 wide) 2 threads gave a different gradient in 10 of 10 tries."""
    from model import Recency
    from perceiver import PerceiverResampler
    torch.set_num_threads(2)
    m = Recency(50, 64) if module == "recency" else PerceiverResampler(64, n_latents=16, max_events=50)
    x = torch.randn(64, 50, 64)
    mask = torch.arange(50)[None] >= torch.randint(0, 40, (64, 1))  # left padding, as the data has
    out = m(x, mask)
    g = torch.randn_like(out[0] if isinstance(out, tuple) else out)

    def grads():
        m.zero_grad()
        out = m(x, mask)
        ((out[0] if isinstance(out, tuple) else out) * g).sum().backward()
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    first = grads()
    for _ in range(10):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))

"""eval.py: the plain ranking (one forward per title) equals the fast trie ranking, score for score
and metric for metric; an encoder checkpoint's table holds most popular and the oracle."""
import json
import shutil

import pytest
import torch

import eval as evaluation
import train_llm
from config import UserError
from conftest import tiny_llm
from data import Prompter, get_tokenizer
from decode import answer_logprobs
from test_decode import ANSWERS, EOT, model_and_context
from userllm import build_model


@pytest.mark.parametrize("kind", ["xattn", "soft_prompt", "none"])
def test_title_logprobs_equal_the_trie_scores(kind):
    """title_logprobs, the form a reader meets first (a forward over prompt + title for every
    title), gives the trie's numbers, with a user context of each kind; a changed answer changes its
    score."""
    model, context = model_and_context(kind)
    idx = torch.randint(0, EOT, (3, 7))
    plain = evaluation.title_logprobs(model, idx, context, ANSWERS)
    torch.testing.assert_close(plain, answer_logprobs(model, idx, context, ANSWERS), atol=1e-5,
                               rtol=1e-5)
    other = evaluation.title_logprobs(model, idx, context, [[5, 6, 9, EOT]] + ANSWERS[1:])
    assert not torch.allclose(other[:, 0], plain[:, 0]) and torch.equal(other[:, 1:], plain[:, 1:])


def test_evaluate_llm_is_the_same_with_and_without_the_search(small):
    """The whole next-item evaluation of a User-LLM (random weights, gates open) gives the same
    metrics through the top-10 search (--fast=True) and through every title's score
    (--fast=False)."""
    torch.manual_seed(0)
    tok = get_tokenizer("scratch")
    model = build_model(tiny_llm(strategy="full"), small, tok).eval()
    with torch.no_grad():
        for blk in model.llm.xattn.values():
            blk.gate_attn.fill_(1.0)
    prompter = Prompter(small, tok, "next_item", 0, 512, 64)
    targets = small.targets("test")[:24]
    fast, plain = (evaluation.evaluate_llm(model, prompter, small, targets, 10, "cpu", batch_size=8,
                                           beam=0, fast=f) for f in (True, False))
    assert set(fast) == {"recall@1", "recall@5", "recall@10", "ndcg@10"}
    assert fast == pytest.approx(plain, rel=1e-6) and fast["recall@10"] > 0


def test_a_checkpoint_is_refused_on_data_whose_text_changed(small, tmp_path):
    """The fingerprint covers the text an LLM reads and writes: the same events with one title
    changed are other data, refused in one line. Each evaluation writes its own file: every test
    user (eval_test.json) and a seeded subset (eval_test_10.json) do not overwrite each other."""
    data = tmp_path / "data"
    shutil.copytree(small.path, data)
    train_llm.main([f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--max_steps=0",
                    "--n_layer=1", "--n_embd=32", "--n_head=2", "--enc_n_embd=16",
                    "--enc_n_layer=1", "--enc_n_head=2", "--enc_feature_dims=(8, 4, 4)",
                    "--seq_len=10", "--eval_examples=8"])
    ckpt = f"--ckpt={tmp_path / 'run' / 'best.pt'}"
    evaluation.main([ckpt, "--max_examples=10", "--beam=0"])
    evaluation.main([ckpt, "--exact=False", "--beam=2"])
    files = sorted(p.name for p in (tmp_path / "run").glob("eval_*.json"))
    assert files == ["eval_test.json", "eval_test_10.json"]
    subset = json.loads((tmp_path / "run" / "eval_test_10.json").read_text())
    assert (subset["config"]["max_examples"] == 10
            and "recall@10" in subset["results"]["most popular"])
    titles = json.loads((data / "item_titles.json").read_text())
    titles[5] = titles[5] + " II"
    (data / "item_titles.json").write_text(json.dumps(titles))
    with pytest.raises(UserError,
                       match="best.pt was trained on .* not on .*: refusing the mismatch"):
        evaluation.main([ckpt, "--max_examples=10", "--beam=0"])
    for bad in ("--split=foo", "--max_examples=-1"):
        with pytest.raises(UserError, match=f"^config: {bad[2:].split('=')[0]}=.* is not allowed"):
            evaluation.main([ckpt, bad])

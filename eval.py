"""
The paper's metrics (Sec 4, Tables 2, 4, 5): the test split, once, from a checkpoint chosen on
validation.

    python eval.py --ckpt=out/synthetic-enc/best.pt     # an encoder: Recall@1/5/10, NDCG@10
    python eval.py --ckpt=out/synthetic-llm/best.pt --max_examples=500    # an LLM

Encoders (Table 2): every example is scored against every item of the catalogue. Nothing is filtered
(items in the history stay in the ranking); ties count against the target, so a constant scorer gets
no credit. LLMs, next item (Sec 4.2): every title of the catalogue ranked by its summed
log-probability after the prompt, no length normalisation (recall@k, ndcg@10: exact). Beside it,
paper-style generation: beam search constrained to the catalogue's titles (beam_recall@k), which
misses titles the beams drop early. Favourite genre/category: every candidate ranked by
log-likelihood. Review generation: greedy decoding, ROUGE F1. --max_examples=K evaluates a seeded
subset of K users and says so. Prints a table; writes eval_<split>.json beside the checkpoint.
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from common import (DEVICES, checkpoint_data, eval_file, evaluate_ranking, load_checkpoint,
                    load_weights, print_table, ranking_metrics, reference_rows, seeded_subset,
                    to_device, write_atomic)
from config import UserError, at_least, cli, configure, one_of
from data import Prompter, by_prompt_length, get_tokenizer
from decode import Trie, beam_search, generate, top_answers
from encoder import EncoderConfig, make_encoder
from userllm import describe, from_checkpoint

DEFAULTS = dict(
    ckpt="", split="test", data_dir="", batch_size=64, max_examples=0, seed=1337, device="cpu",
    beam=10,  # LLMs, next item: beam search's beams (0: none)
    exact=True,  # LLMs: rank every candidate by log-likelihood
    fast=True,  # ... by an exact search for the top 10 (decode.top_answers): the same numbers
)
RULES = dict(split=one_of("train", "val", "test"), batch_size=at_least(1), max_examples=at_least(0),
             seed=at_least(0), beam=at_least(0), device=one_of(*DEVICES))


@torch.no_grad()
def title_logprobs(llm, idx, context, answers):
    """The summed log-probability of every candidate answer (token lists) after each prompt idx (B,
    P), one forward pass over prompt + answer per candidate: (B, C). The plain form of the ranking
    behind Recall@k. decode.top_answers finds the top 10 of these, exactly, at a fraction of the
    cost (--fast=True, tested equal)."""
    B, P = idx.shape
    scores = torch.empty(B, len(answers), device=idx.device)
    for c, answer in enumerate(answers):
        a = torch.tensor(answer, device=idx.device).expand(B, -1)  # (B, A)
        logits, _ = llm(torch.cat([idx, a[:, :-1]], dim=1), **context)  # (B, P + A - 1, V)
        logp = F.log_softmax(logits[:, P - 1:].float(), dim=-1)  # (B, A, V): the answer's tokens
        scores[:, c] = logp.gather(2, a[..., None]).sum((1, 2))
    return scores


def top_metrics(top, labels):
    """Recall@1/5/10 and NDCG@10 from each example's exact top 10 (decode.top_answers: (answer,
    log-probability) best first, ties with the 10th included) and its label: what ranking_metrics
    gives on every candidate's score, ties counted against the label."""
    ranks = []
    for found, y in zip(top, labels):
        scores = dict(found)
        if y not in scores:
            ranks.append(10)  # below the top 10: no credit at any k <= 10
            continue
        s = scores[y]
        ranks.append(sum(v > s for v in scores.values()) + sum(v == s for v in scores.values()) - 1)
    ranks = np.array(ranks)
    out = {f"recall@{k}": float((ranks < k).mean()) for k in (1, 5, 10)}
    out["ndcg@10"] = float(np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    return out


@torch.no_grad()
def evaluate_llm(model, prompter, d, targets, seq_len, device, batch_size=32, beam=10, exact=True,
                 fast=True):
    """A UserLLM's task metrics (Sec 4.2): next item -> Recall@1/5/10 and NDCG@10 by ranking every
    title by log-likelihood (exact) and beam_recall@1/5/10 from catalogue-constrained beam search
    (beam > 0); favourite genre/category -> the same ranking over every candidate; review generation
    -> ROUGE F1."""
    prompts, sums, n = prompter.prompts(targets), {}, 0
    trie = Trie(prompter.answers) if prompter.task == "next_item" and beam else None
    rank_all = prompter.task != "review_gen" and (trie is None or exact)
    answers = prompter.answers[1:]  # ids 1..C (0: padding)
    for group in by_prompt_length(prompts, batch_size):
        ids = targets[group]
        batch = to_device(d.batch(ids, seq_len), device)
        idx = torch.tensor([prompts[i] for i in group], device=device)
        context = model.context(batch["hist"])
        metrics = {}
        if prompter.task == "review_gen":
            metrics = rouge(model.llm, idx, context, [d.review(t) for t in ids], prompter)
        else:
            label = (batch["fav"] if prompter.task == "fav" else batch["target"][0]).tolist()
            if trie is not None:
                hyps = beam_search(model.llm, idx, beam, max(map(len, prompter.answers)),
                                   eos=prompter.eot, allowed=trie.allowed, **context)
                ranked = [[trie.ids[tuple(h)] for h, _ in hs] for hs in hyps]
                for k in (1, 5, 10):
                    hits = [y in r[:k] for y, r in zip(label, ranked)]
                    metrics[f"beam_recall@{k}"] = np.mean(hits)
            if rank_all and fast:  # the top 10 of every title by log-likelihood, searched
                top = top_answers(model.llm, idx, context, answers, k=10)
                metrics.update(top_metrics(top, [y - 1 for y in label]))
            elif rank_all:  # every title's log-likelihood
                scores = title_logprobs(model.llm, idx, context, answers)  # (B, C)
                scores = torch.cat([torch.full_like(scores[:, :1], -np.inf), scores], 1)  # 0: pad
                metrics.update(ranking_metrics(scores, torch.tensor(label, device=device)))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(group)
        n += len(group)
    return {k: v / n for k, v in sums.items()}


def rouge(llm, idx, context, references, prompter):
    """Greedy-decoded reviews against the users' real ones, rouge-score's F1 (stemmed)."""
    from rouge_score import rouge_scorer
    out = generate(llm, idx, prompter.max_answer + 1, eos=prompter.eot, **context)
    texts = [prompter.tok.decode([t for t in row if t != prompter.eot])
             for row in out[:, idx.size(1):].tolist()]
    kinds = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    scores = [scorer.score(ref, hyp) for ref, hyp in zip(references, texts)]
    return {k: np.mean([s[k].fmeasure for s in scores]) for k in kinds}


def evaluate_encoder(cfg, ckpt):
    """An encoder checkpoint's ranking of the whole catalogue, beside most popular (and the
    oracle)."""
    model = make_encoder(EncoderConfig(**ckpt["encoder_config"])).to(cfg.device)
    load_weights(model, ckpt["model"], cfg.ckpt)
    model.eval()
    d = checkpoint_data(ckpt, cfg.ckpt, cfg.data_dir)
    targets = seeded_subset(d.targets(cfg.split), cfg.max_examples, cfg.seed)
    seq_len, label = ckpt["config"]["seq_len"], model.cfg.label
    rows = {f"{model.cfg.kind} encoder": evaluate_ranking(model.scores, d, targets, seq_len, label,
                                                           cfg.batch_size, cfg.device)}
    rows.update(reference_rows(d, cfg.split, targets, seq_len, label, cfg.batch_size, cfg.device))
    what = "next item" if label == "item" else f"favourite {d.features[1]}"
    print(f"{what}, {cfg.split} split, {len(targets)} examples, full ranking over "
          f"{d.vocab_sizes[0 if label == 'item' else 1] - 1} candidates")
    return rows


def evaluate_llm_checkpoint(cfg, ckpt):
    """A train_llm.py checkpoint's task metrics, beside most popular (and the oracle)."""
    d = checkpoint_data(ckpt, cfg.ckpt, cfg.data_dir)
    tok = get_tokenizer(ckpt["config"]["llm"])
    tcfg, model = from_checkpoint(ckpt, cfg.ckpt, d, tok, cfg.device)
    prompter = Prompter(d, tok, tcfg.task, tcfg.text_events, tcfg.max_text_tokens,
                        tcfg.max_answer_tokens)
    targets = seeded_subset(d.targets(cfg.split), cfg.max_examples, cfg.seed)
    torch.manual_seed(cfg.seed)
    rows = {describe(tcfg): evaluate_llm(model, prompter, d, targets, tcfg.seq_len, cfg.device,
                                         cfg.batch_size, cfg.beam, cfg.exact, cfg.fast)}
    if tcfg.task != "review_gen":
        label = "item" if tcfg.task == "next_item" else "fav"
        rows.update(reference_rows(d, cfg.split, targets, tcfg.seq_len, label, cfg.batch_size,
                                   cfg.device))
    ranked = tcfg.task == "next_item" and (cfg.exact or not cfg.beam)
    print(f"{tcfg.task}, {cfg.split} split, {len(targets)} examples"
          + ("; recall@k, ndcg@10: every title ranked by log-likelihood (exact)" if ranked else "")
          + (f"; beam_recall@k: beam search ({cfg.beam} beams) constrained to the catalogue"
             if tcfg.task == "next_item" and cfg.beam else ""))
    return rows


def main(argv):
    cfg = configure(DEFAULTS, argv, __doc__, RULES)
    if not cfg.ckpt:
        raise UserError("eval.py: give a checkpoint, e.g. --ckpt=out/synthetic-enc/best.pt")
    ckpt = load_checkpoint(cfg.ckpt)
    rows = (evaluate_llm_checkpoint if "llm_config" in ckpt else evaluate_encoder)(cfg, ckpt)
    print_table(rows)
    out = os.path.join(os.path.dirname(cfg.ckpt), eval_file(cfg.split, cfg.max_examples, cfg.seed))
    result = {"checkpoint": cfg.ckpt, "split": cfg.split, "config": vars(cfg),
              "data": ckpt["data"], "results": rows}
    try:
        write_atomic(out, json.dumps(result, indent=2))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    cli(main)

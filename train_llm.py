"""
Contextualize an LLM with user embeddings (paper Sec 3.2, App. B) for a task (Sec 4.2-4.5).

    python train_llm.py configs/synthetic_gpt.py      # the stand-in LLM, without user context
    python train_llm.py configs/synthetic_llm.py      # User-LLM on the synthetic default, CPU
    torchrun --nproc_per_node=8 train_llm.py configs/ml20m_enc.py     # the paper's setting, GPT-2

The model (userllm.UserLLM): user encoder -> [Perceiver] -> gated cross-attention or soft prompt ->
GPT, with the strategies full / lora / enc / proj; its keys are userllm.DEFAULTS (--help lists
them). The loss is on the answer tokens only; the LLM's input is a short fixed query;
out_dir/best.pt is the checkpoint with the lowest validation loss.
"""
import dataclasses
import os
import time

from common import (Run, adamw, all_reduce_sum, check_train_config, clip_and_step,
                    evaluate_loss, evaluating, get_lr, micro_batches, no_sync, seed_all,
                    seeded_subset, set_lr, setup, teardown, to_device)
from config import cli, configure
from data import Prompter, UserData, get_tokenizer, train_batches
from userllm import DEFAULTS, RULES, build_model, load_llm


def lr_multipliers(cfg):
    """Ours (docs/deviations.md): the new layers between encoder and LLM (cross-attention, recency
    embedding, soft prompt) train at fusion_lr_mult x lr, their gates at gate_lr_mult x that; the
    Perceiver, which starts as a working resampler, at perceiver_lr_mult x lr."""
    new = cfg.fusion_lr_mult
    return {"gate_": new * cfg.gate_lr_mult, "llm.xattn.": new, "soft_prompt.": new,
            "recency.": new, "perceiver.": cfg.perceiver_lr_mult}


def main(argv):
    cfg = configure(DEFAULTS, argv, __doc__, RULES)
    check_train_config(cfg)  # before any work or any write
    rt = setup(cfg.device, cfg.dtype, cfg.seed)
    d = UserData(cfg.data_dir or os.path.join("data", cfg.dataset))
    tok = get_tokenizer(cfg.llm)
    model = build_model(cfg, d, tok)
    if cfg.llm_ckpt:
        load_llm(model, cfg.llm_ckpt, d)
    model.to(rt.device)
    prompter = Prompter(d, tok, cfg.task, cfg.text_events, cfg.max_text_tokens,
                        cfg.max_answer_tokens, cfg.pack_examples, cfg.mixed_history)
    if rt.master:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"UserLLM: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained "
              f"({cfg.strategy}); config: {vars(cfg)}")
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), lr_multipliers(cfg))
    enc_cfg = dataclasses.asdict(model.encoder.cfg) if model.encoder else None
    run = Run(cfg, rt, model, optimizer, select="loss", higher_is_better=False,
              extra={"encoder_config": enc_cfg, "llm_config": dataclasses.asdict(model.llm.config),
                     "data": d.fingerprint()})
    train_batch = train_batches(d.targets("train", cfg.min_history), cfg.batch_size, cfg.seed,
                                cfg.length_groups, prompter.prompt_lengths)  # step -> global batch
    val_targets = seeded_subset(d.targets("val"), cfg.eval_examples, cfg.seed)  # every rank: all

    def make_batch(ids):  # events, then the task's prompt and answer tokens
        return to_device(prompter(d.batch(ids, cfg.seq_len), ids), rt.device)

    train_model = run.wrap(model)  # compiled and/or DDP
    while True:
        lr = get_lr(run.step, cfg)
        set_lr(optimizer, lr)
        if run.due():  # validate, log, save ckpt.pt (and best.pt)
            with evaluating(model, rt):
                run.validated_with(evaluate_loss(model, make_batch, val_targets, rt))
        if run.step == cfg.max_steps:
            break
        cpu0 = time.process_time()
        ids = train_batch(run.step)
        micro = micro_batches(ids, rt, cfg.grad_accum)  # this rank's share, (chunk, ids) each
        loss = 0.0
        for i, (chunk, micro_ids) in enumerate(micro):
            batch = make_batch(micro_ids)
            seed_all(cfg.seed, 0, run.step, chunk)  # dropout: the same whatever the world size
            with no_sync(train_model, sync=i == len(micro) - 1), rt.autocast():
                micro_loss = train_model(batch) / len(micro)
            run.scaler.scale(micro_loss).backward()
            loss += micro_loss.item()
        loss = all_reduce_sum([loss], rt)[0] / rt.world_size  # the global batch's mean loss
        run.check_finite(loss)
        clip_and_step(optimizer, run.scaler, model, cfg.grad_clip)
        run.stepped(loss, lr, time.process_time() - cpu0, model.gates())  # tanh of the gates
    run.close()
    teardown(rt)


if __name__ == "__main__":
    cli(main)

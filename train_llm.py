"""
Contextualize an LLM with user embeddings (paper Sec 3.2, App. B) and fine-tune it on a task (Sec 4.2-4.5).

    python train_llm.py configs/synthetic_llm.py                  # User-LLM on the synthetic default, CPU
    python train_llm.py configs/ml20m_enc.py                      # the paper's main setting (GPT-2, GPU)
    torchrun --nproc_per_node=8 train_llm.py configs/ml20m_enc.py

The model (userllm.UserLLM): user encoder -> [Perceiver] -> gated cross-attention or soft prompt -> GPT, with the
strategies full / lora / enc / proj; the config keys and their defaults are userllm.DEFAULTS (--help lists them).
The loss is on the answer tokens only; the LLM's input is a short fixed task query (the paper's is 32 tokens); the
best checkpoint is chosen by validation loss.
"""
import dataclasses
import os
import sys

from common import (Selection, adamw, check_train_config, cleanup_distributed, configure, evaluate_loss,
                    seeded_subset, setup_distributed, to_device, train)
from data import Prompter, UserData, batch_targets, get_tokenizer
from userllm import DEFAULTS, build_model, load_llm


def fusion_lr_mult(cfg):
    """The new layers between encoder and LLM (cross-attention, recency embedding, soft prompt) train at
    fusion_lr_mult x lr, the gates at gate_lr_mult x that (configs/synthetic_llm.py says why). The Perceiver trains at
    perceiver_lr_mult x lr: unlike those, it starts as a working resampler, which 10x scrambles before a gate opens."""
    new = cfg.fusion_lr_mult
    return {"gate_": new * cfg.gate_lr_mult, "llm.xattn.": new, "soft_prompt.": new, "recency.": new,
            "perceiver.": cfg.perceiver_lr_mult}


def main(argv):
    cfg = configure(DEFAULTS, argv, __doc__)
    check_train_config(cfg)
    ctx = setup_distributed(cfg.device, cfg.dtype, cfg.seed)
    d = UserData(cfg.data_dir or os.path.join("data", cfg.dataset))
    tok = get_tokenizer(cfg.llm)
    model = build_model(cfg, d, tok)
    if cfg.llm_ckpt:
        load_llm(model, cfg.llm_ckpt, d)
    model.to(ctx.device)
    prompter = Prompter(d, tok, cfg.task, cfg.text_events, cfg.max_text_tokens, cfg.max_answer_tokens,
                        cfg.pack_examples, cfg.mixed_history)
    if ctx.master:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"UserLLM: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained ({cfg.strategy}); "
              f"config: {vars(cfg)}")
    train_targets = d.targets("train", cfg.min_history)
    val_targets = seeded_subset(d.targets("val"), cfg.eval_examples, cfg.seed)  # every rank: all of them

    def make_batch(ids):
        return to_device(prompter(d.batch(ids, cfg.seq_len), ids), ctx.device)

    optimizer = adamw(model, cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), lr_mult=fusion_lr_mult(cfg))
    train(cfg, ctx, model, optimizer,
          global_batch=lambda step: batch_targets(train_targets, step, cfg.batch_size, cfg.seed),
          make_batch=make_batch, evaluate=lambda m: evaluate_loss(m, make_batch, val_targets, ctx),
          select=Selection("loss", higher_is_better=False),
          extra={"encoder_config": dataclasses.asdict(model.encoder.cfg) if model.encoder else None,
                 "llm_config": dataclasses.asdict(model.llm.config), "data": d.fingerprint()},
          watch=model.gates)
    cleanup_distributed(ctx)


if __name__ == "__main__":
    main(sys.argv[1:])

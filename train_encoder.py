"""
Pretrain a user encoder (paper Sec 3.1, App. A, App. C): the User-LLM autoregressive encoder (kind='ar'), or the
baselines Bert4Rec (kind='bert4rec') and Dual Encoder (kind='dual').

    python data.py                                           # the synthetic default, written to data/synthetic
    python train_encoder.py configs/synthetic_enc.py         # a few minutes on a laptop CPU
    python train_encoder.py configs/ml20m.py                 # the paper's MovieLens encoder (GPU)
    torchrun --nproc_per_node=8 train_encoder.py configs/ml20m.py

Validation (all ranks): next-event loss and next-item Recall@10 (favourite-genre Recall@10 for a 'fav' DualEnc) on the
validation split; the best checkpoint by that Recall is out_dir/best.pt, the latest is out_dir/ckpt.pt.
"""
import dataclasses
import os
import sys

from common import (Selection, adamw, check_train_config, cleanup_distributed, configure, evaluate_ranking,
                    seeded_subset, setup_distributed, to_device, train)
from data import UserData, batch_targets
from encoder import DEFAULTS, encoder_config, make_encoder


def main(argv):
    cfg = configure(DEFAULTS, argv, __doc__)
    check_train_config(cfg)
    ctx = setup_distributed(cfg.device, cfg.dtype, cfg.seed)
    d = UserData(cfg.data_dir or os.path.join("data", cfg.dataset))
    enc_cfg = encoder_config(cfg, d.vocab_sizes)
    model = make_encoder(enc_cfg).to(ctx.device)
    if ctx.master:
        print(f"{cfg.kind} encoder: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
              f"config: {vars(cfg)}")
    train_targets = d.targets("train", cfg.min_history)
    val_targets = seeded_subset(d.targets("val"), cfg.eval_examples, cfg.seed)  # every rank: all of them
    train(
        cfg, ctx, model, adamw(model, cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), {"seen_bias": cfg.seen_bias_lr_mult}),
        global_batch=lambda step: batch_targets(train_targets, step, cfg.batch_size, cfg.seed),
        make_batch=lambda ids: to_device(d.batch(ids, cfg.seq_len), ctx.device),
        evaluate=lambda m: evaluate_ranking(m.scores, d, val_targets, cfg.seq_len, enc_cfg.label, device=ctx.device,
                                            loss_fn=m.loss, ctx=ctx, seed=cfg.seed),
        select=Selection("recall@10", higher_is_better=True),
        extra={"encoder_config": dataclasses.asdict(enc_cfg), "data": d.fingerprint()},
        units_per_example=cfg.seq_len,
        watch=lambda: {} if model.seen_bias is None else {"seen_bias": model.seen_bias.item()},  # logged as it learns
    )
    cleanup_distributed(ctx)


if __name__ == "__main__":
    main(sys.argv[1:])

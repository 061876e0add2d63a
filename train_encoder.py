"""
Pretrain a user encoder (paper Sec 3.1, App. A; optimisation: App. C): User-LLM's autoregressive
encoder (kind='ar'), or the baselines Bert4Rec (kind='bert4rec') and Dual Encoder (kind='dual').

    python data.py && python train_encoder.py configs/synthetic_enc.py   # CPU, about 2 minutes
    torchrun --nproc_per_node=8 train_encoder.py configs/ml20m.py        # MovieLens-20M

Each validation (all ranks) measures the next-event loss and next-item Recall@10 on the validation
split; out_dir/best.pt is the best checkpoint by that Recall, out_dir/ckpt.pt the latest.
"""
import dataclasses
import os
import time

from common import (Run, adamw, all_reduce_sum, check_train_config, clip_and_step,
                    evaluate_ranking, evaluating, get_lr, micro_batches, no_sync, seed_all,
                    seeded_subset, set_lr, setup, teardown, to_device)
from config import cli, configure
from data import UserData, batch_targets
from encoder import DEFAULTS, RULES, encoder_config, make_encoder


def main(argv):
    cfg = configure(DEFAULTS, argv, __doc__, RULES)
    check_train_config(cfg)  # before any work or any write
    rt = setup(cfg.device, cfg.dtype, cfg.seed)
    d = UserData(cfg.data_dir or os.path.join("data", cfg.dataset))
    model = make_encoder(encoder_config(cfg, d.vocab_sizes)).to(rt.device)
    if rt.master:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{cfg.kind} encoder: {n_params / 1e6:.2f}M parameters; config: {vars(cfg)}")
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, (0.9, cfg.beta2),
                      lr_mult={"seen_bias": cfg.seen_bias_lr_mult})
    run = Run(cfg, rt, model, optimizer, select="recall@10", units_per_example=cfg.seq_len,
              extra={"encoder_config": dataclasses.asdict(model.cfg), "data": d.fingerprint()})
    train_targets = d.targets("train", cfg.min_history)
    val_targets = seeded_subset(d.targets("val"), cfg.eval_examples, cfg.seed)  # every rank: all
    train_model = run.wrap(model)  # compiled and/or DDP
    while True:
        lr = get_lr(run.step, cfg)
        set_lr(optimizer, lr)
        if run.due():  # validate, log, save ckpt.pt (and best.pt)
            with evaluating(model, rt):
                run.validated_with(evaluate_ranking(
                    model.scores, d, val_targets, cfg.seq_len, model.cfg.label, device=rt.device,
                    loss_fn=model.loss, rt=rt, seed=cfg.seed))
        if run.step == cfg.max_steps:
            break
        cpu0 = time.process_time()
        ids = batch_targets(train_targets, run.step, cfg.batch_size, cfg.seed)  # the global batch
        micro = micro_batches(ids, rt, cfg.grad_accum)  # this rank's share, (chunk, ids) each
        loss = 0.0
        for i, (chunk, micro_ids) in enumerate(micro):
            batch = to_device(d.batch(micro_ids, cfg.seq_len), rt.device)
            seed_all(cfg.seed, 0, run.step, chunk)  # dropout, masks: the same for any world size
            with no_sync(train_model, sync=i == len(micro) - 1), rt.autocast():
                micro_loss = train_model(batch) / len(micro)
            run.scaler.scale(micro_loss).backward()
            loss += micro_loss.item()
        loss = all_reduce_sum([loss], rt)[0] / rt.world_size  # the global batch's mean loss
        run.check_finite(loss)
        clip_and_step(optimizer, run.scaler, model, cfg.grad_clip)
        seen_bias = {} if model.seen_bias is None else {"seen_bias": model.seen_bias.item()}
        run.stepped(loss, lr, time.process_time() - cpu0, seen_bias)
    run.close()
    teardown(rt)


if __name__ == "__main__":
    cli(main)

#!/bin/bash
# Paper Fig. 3 at CPU scale, on the synthetic default: User-LLM and TextPrompt as the history grows
# (N = 10, 25, 50 events, and User-LLM at 100; synthetic users have 40-120 events, so at 200 it would
# read the same histories as at 120). For each seed given:
#     bash experiments/fig3.sh 1        (then 2 3; one seed per core at once)
# after `bash experiments/synthetic.sh SEED` (this seed's encoder, stand-in and User-LLM at N = 50).
# - User-LLM at N: the encoder reads the latest N events (seq_len=N); the LLM's input stays one short
#   query. The scratch GPT has max_text_tokens + 4 + seq_len positions (room for a soft prompt), so
#   max_text_tokens=562-N keeps the stand-in's 566. At N = 100 the encoder is pretrained on 100
#   events (its learned positions stop at the N it was trained on; 10 and 25 read the latest of the
#   50-event one's).
# - TextPrompt TP-N: the latest N events written into the prompt (up to 1,654 bytes at N = 50), from
#   one stand-in per seed that has read 0-50 events written out, pretrained as TP10's (1,000 steps).
# - Batches grouped by prompt length (length_groups=16, docs/deviations.md) for the stand-in and
#   TextPrompt: a batch pads to its own longest prompt (bench.py --length_groups=16: 2.65x and 1.58x).
# Cost per seed, one thread: User-LLM about 6 minutes per N (16 at N = 100 with its encoder); the
# stand-in 3.1 CPU-s per step (51 CPU-minutes), TP50 about 6 (2 CPU-hours; scoring its 500 test
# users about 1.5 more), TP25 and TP10 less: about 7 CPU-hours in all.
# The figure, each point the mean over the seeds, and its table (seeds, mean ± sd, training CPU-ms
# per example):
#     python report.py --fig3=fig3.svg --examples=500 \
#         --runs='out/syn-s[123]/fig3-userllm*,out/syn-s[123]/userllm,out/syn-s[123]/fig3-tp[0-9][0-9]'
set -e
source "$(dirname "$0")/run.sh"
for seed in "$@"; do
    o=out/syn-s$seed
    [ -f $o/enc/done ] && [ -f $o/gpt/done ] || { echo "$o: run experiments/synthetic.sh $seed first"; exit 1; }
    pair="--encoder_ckpt=$o/enc/best.pt --llm_ckpt=$o/gpt/best.pt"
    for n in 10 25; do
        run $o/fig3-userllm$n train_llm.py configs/synthetic_llm.py --seed=$seed $pair --seq_len=$n \
            --max_text_tokens=$((562 - n))
    done
    run $o/fig3-enc100 train_encoder.py configs/synthetic_enc.py --seed=$seed --seq_len=100
    run $o/fig3-userllm100 train_llm.py configs/synthetic_llm.py --seed=$seed --seq_len=100 \
        --encoder_ckpt=$o/fig3-enc100/best.pt --llm_ckpt=$o/gpt/best.pt --max_text_tokens=462
    hist=$o/fig3-gpt-hist50
    run $hist train_llm.py configs/synthetic_gpt.py --seed=$seed --mixed_history=50 --max_text_tokens=1664 \
        --max_steps=1000 --min_lr=3e-4 --length_groups=16
    for n in 10 25 50; do
        run $o/fig3-tp$n train_llm.py configs/synthetic_llm.py --seed=$seed --fusion=none --text_events=$n \
            --max_text_tokens=1664 --llm_ckpt=$hist/best.pt --length_groups=16
    done
done

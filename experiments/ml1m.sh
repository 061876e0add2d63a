#!/bin/bash
# MovieLens-1M (docs/results.md), for each seed given:
#     bash experiments/ml1m.sh 1337 1 2        (or one seed per core at once)
# The MovieLens-100K pipeline at ten times the data: the encoder (configs/ml1m.py without the seen
# bias, as the 100K pipeline), the stand-in LLM (configs/ml1m_gpt.py: its row is the GPT without
# user context), User-LLM Full (configs/ml1m_llm.py, the 100K recipe) and, LLM frozen, Enc; the Dual
# Encoder and User-LLM Full on it; Bert4Rec. Then Full with the pretrained LLM and encoder at a tenth
# of the rate and the new layers at the same 3e-3 (at the 100K recipe Full's gates stay shut here:
# docs/results.md). Every run is evaluated on all 6,040 test users (every one of the 3,706 titles
# ranked by log-likelihood for the LLMs: 7-13 minutes each). One CPU thread per run, training CPU per
# seed: encoder 32 min, stand-in 19, Full 39, Enc 34, Dual Encoder 40, Bert4Rec 17, low-rate Full 40
# (3.7 hours), plus User-LLM on the Dual Encoder (not yet run to the end here). A finished run
# (out_dir/done) is skipped. Needs the data first:
#     ../shared/datasets/ml1m.sh data/raw/ml1m && python data.py --dataset=ml1m --raw_dir=data/raw/ml1m
set -e
source "$(dirname "$0")/run.sh"
real_pipeline ml1m "$@"
for seed in "$@"; do
    o=out/ml1m-s$seed
    run $o/userllm-lowlr train_llm.py configs/ml1m_llm.py --seed=$seed --encoder_ckpt=$o/enc/best.pt \
        --llm_ckpt=$o/gpt/best.pt --lr=3e-5 --min_lr=3e-6 --fusion_lr_mult=100
done
python report.py --summary=True --runs='out/ml1m-s*/*'

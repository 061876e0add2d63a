#!/bin/bash
# MovieLens-1M (docs/results.md), for each seed given:
#     bash experiments/ml1m.sh 1337 1 2        (or one seed per core at once)
# The MovieLens-100K pipeline at ten times the data: the encoder (configs/ml1m.py without the seen
# bias, as the 100K pipeline), the stand-in LLM (configs/ml1m_gpt.py: its row is the GPT without
# user context), User-LLM Full (configs/ml1m_llm.py) and, LLM frozen, Enc. Every run is evaluated on
# all 6,040 test users (every one of the 3,706 titles ranked by log-likelihood for the LLMs). One CPU
# thread per run; a finished run (out_dir/done) is skipped. Needs the data first:
#     ../shared/datasets/ml1m.sh data/raw/ml1m && python data.py --dataset=ml1m --raw_dir=data/raw/ml1m
# The table: python report.py --summary=True --runs='out/ml1m-s*/*'
set -e
source "$(dirname "$0")/run.sh"
EVAL_EXAMPLES=0  # every test user
[ -d data/ml1m ] || { echo "data/ml1m is missing: prepare MovieLens-1M first (see above)"; exit 1; }
for seed in "$@"; do
    o=out/ml1m-s$seed
    run $o/enc train_encoder.py configs/ml1m.py --seed=$seed --seen_bias=False
    run $o/gpt train_llm.py configs/ml1m_gpt.py --seed=$seed
    pair="--encoder_ckpt=$o/enc/best.pt --llm_ckpt=$o/gpt/best.pt"
    run $o/userllm train_llm.py configs/ml1m_llm.py --seed=$seed $pair
    run $o/enc-strategy train_llm.py configs/ml1m_llm.py --seed=$seed $pair --strategy=enc
done
python report.py --summary=True --runs='out/ml1m-s*/*'

#!/bin/bash
# MovieLens-1M (docs/results.md), for each seed given:
#     bash experiments/ml1m.sh 1337 1 2        (or one seed per core at once)
# The MovieLens-100K pipeline at ten times the data: the encoder (configs/ml1m.py without the seen
# bias, as the 100K pipeline), the stand-in LLM (configs/ml1m_gpt.py: its row is the GPT without
# user context), User-LLM Full (configs/ml1m_llm.py) and, LLM frozen, Enc; the Dual Encoder and User-LLM
# Full on it. Every run is evaluated on
# all 6,040 test users (every one of the 3,706 titles ranked by log-likelihood for the LLMs). One CPU
# thread per run; a finished run (out_dir/done) is skipped. Needs the data first:
#     ../shared/datasets/ml1m.sh data/raw/ml1m && python data.py --dataset=ml1m --raw_dir=data/raw/ml1m
# The table: python report.py --summary=True --runs='out/ml1m-s*/*'
set -e
source "$(dirname "$0")/run.sh"
real_pipeline ml1m "$@"

#!/bin/bash
# The README's User-LLM rows on real MovieLens-100K, for each seed given:
#     bash experiments/ml100k.sh 1337 1 2        (or one seed per core at once)
# The synthetic pipeline's commands with MovieLens-100K siblings of its configs: pretrain the encoder
# (configs/ml100k.py) and the stand-in LLM (configs/ml100k_gpt.py: its row is the GPT without user context),
# contextualize it (configs/ml100k_llm.py: User-LLM, Full) and, frozen, with --strategy=enc; late fusion: the Dual
# Encoder (--kind=dual) and User-LLM Full on it; Bert4Rec (--kind=bert4rec). Every run is evaluated on
# all 943 test users (every one of the 1,682 titles ranked by log-likelihood; the encoder ranks item ids), as the
# library reference is. One CPU thread per run: training about 37 CPU-minutes per seed for the encoder, the
# stand-in and Full (docs/results.md), plus Enc; each LLM evaluates in about 45 s. A finished run (out_dir/done)
# is skipped. Needs the data first:
#     ../shared/datasets/ml100k.sh data/raw/ml100k && python data.py --dataset=ml100k --raw_dir=data/raw/ml100k
# The table: python report.py --summary=True --runs='out/ml100k-s*/*'
set -e
source "$(dirname "$0")/run.sh"
real_pipeline ml100k "$@"
python report.py --summary=True --runs='out/ml100k-s*/*'

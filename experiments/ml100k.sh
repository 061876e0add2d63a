#!/bin/bash
# The README's User-LLM rows on real MovieLens-100K, for each seed given:
#     bash experiments/ml100k.sh 1337 1 2        (or one seed per core at once)
# The synthetic pipeline's commands with MovieLens-100K siblings of its configs: pretrain the encoder
# (configs/ml100k.py) and the stand-in LLM (configs/ml100k_gpt.py: its row is the GPT without user context),
# contextualize it (configs/ml100k_llm.py: User-LLM, Full) and, frozen, with --strategy=enc. Every run is evaluated on
# all 943 test users (every one of the 1,682 titles ranked by log-likelihood; the encoder ranks item ids), as the
# library reference is. One CPU thread per run, about 1.6 hours per seed (0.7 of it evaluating the three LLMs); a
# finished run (out_dir/done) is skipped. Needs the data first:
#     ../shared/datasets/ml100k.sh data/raw/ml100k && python data.py --dataset=ml100k --raw_dir=data/raw/ml100k
# The table: python report.py --summary=True --runs='out/ml100k-s*/*'
set -e
source "$(dirname "$0")/run.sh"
EVAL_EXAMPLES=0  # every test user
[ -d data/ml100k ] || { echo "data/ml100k is missing: prepare MovieLens-100K first (see above)"; exit 1; }
for seed in "$@"; do
    o=out/ml100k-s$seed
    # --seen_bias=False: the seen bias is a term of the encoder's own item ranking, which the LLM does not read
    # (docs/deviations.md)
    run $o/enc train_encoder.py configs/ml100k.py --seed=$seed --seen_bias=False
    run $o/gpt train_llm.py configs/ml100k_gpt.py --seed=$seed
    pair="--encoder_ckpt=$o/enc/best.pt --llm_ckpt=$o/gpt/best.pt"
    run $o/userllm train_llm.py configs/ml100k_llm.py --seed=$seed $pair
    run $o/enc-strategy train_llm.py configs/ml100k_llm.py --seed=$seed $pair --strategy=enc
done
python report.py --summary=True --runs='out/ml100k-s*/*'

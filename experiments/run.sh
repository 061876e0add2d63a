# Sourced by the experiment scripts: one CPU thread per run, and
#     run OUT_DIR SCRIPT CONFIG ARGS...
# trains unless OUT_DIR/done exists (an interrupted run resumes from OUT_DIR/ckpt.pt, its last validation), then
# evaluates OUT_DIR/best.pt on the same seeded test users (EVAL_EXAMPLES of them, 500 unless set; 0: every test
# user) unless its results file exists (eval_test.json for every user, eval_test_500.json for 500).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() {
    local out=$1; shift
    local resume=; [ -f $out/ckpt.pt ] && resume=--init_from=resume
    [ -f $out/done ] || { python "$@" --out_dir=$out $resume && touch $out/done; }
    local n=${EVAL_EXAMPLES:-500} results=$out/eval_test.json
    [ "$n" = 0 ] || results=$out/eval_test_$n.json
    [ -f $results ] || python eval.py --ckpt=$out/best.pt --max_examples=$n
}
# The real-data pipeline, for each seed: the encoder without the seen bias (a term of the encoder's own
# item ranking, which the LLM does not read: docs/deviations.md), the stand-in LLM (its row is the GPT
# without user context), User-LLM Full and, LLM frozen, Enc; late fusion: the Dual Encoder and User-LLM Full
# on it; Bert4Rec; every run on every test user (the calling script prints the table).
#     real_pipeline DATASET SEED...     (configs/DATASET.py, DATASET_gpt.py, DATASET_llm.py)
real_pipeline() {
    local name=$1; shift
    [ -d data/$name ] || { echo "data/$name is missing: prepare it first (see the script's header)"; exit 1; }
    EVAL_EXAMPLES=0
    for seed in "$@"; do
        local o=out/$name-s$seed
        run $o/enc train_encoder.py configs/$name.py --seed=$seed --seen_bias=False
        run $o/gpt train_llm.py configs/${name}_gpt.py --seed=$seed
        local pair="--encoder_ckpt=$o/enc/best.pt --llm_ckpt=$o/gpt/best.pt"
        run $o/userllm train_llm.py configs/${name}_llm.py --seed=$seed $pair
        run $o/enc-strategy train_llm.py configs/${name}_llm.py --seed=$seed $pair --strategy=enc
        run $o/dual-enc train_encoder.py configs/$name.py --seed=$seed --seen_bias=False --kind=dual
        run $o/userllm-dual train_llm.py configs/${name}_llm.py --seed=$seed $pair \
            --encoder_ckpt=$o/dual-enc/best.pt
        run $o/bert4rec train_encoder.py configs/$name.py --seed=$seed --seen_bias=False --kind=bert4rec
    done
}

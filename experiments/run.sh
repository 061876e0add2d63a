# Sourced by the experiment scripts: one CPU thread per run, and
#     run OUT_DIR SCRIPT CONFIG ARGS...
# trains unless OUT_DIR/done exists (so an interrupted script resumes), then evaluates OUT_DIR/best.pt on the same
# seeded test users (EVAL_EXAMPLES of them, 500 unless set; 0: every test user) unless its results file exists
# (eval_test.json for every user, eval_test_500.json for 500).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() {
    local out=$1; shift
    [ -f $out/done ] || { python "$@" --out_dir=$out && touch $out/done; }
    local n=${EVAL_EXAMPLES:-500} results=$out/eval_test.json
    [ "$n" = 0 ] || results=$out/eval_test_$n.json
    [ -f $results ] || python eval.py --ckpt=$out/best.pt --max_examples=$n
}

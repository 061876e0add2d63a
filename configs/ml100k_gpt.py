# MovieLens-100K, step 2 of the offline pipeline (README "Real data: MovieLens-100K"): the stand-in LLM pretrained on
# the next-item task's text without user context (training targets only), as configs/synthetic_gpt.py does for the
# synthetic default; only the dataset changes.
# OMP_NUM_THREADS=1 python train_llm.py configs/ml100k_gpt.py      (experiments/ml100k.sh runs the whole pipeline)
exec(open("configs/synthetic_gpt.py").read())
out_dir = "out/ml100k-gpt"
dataset = "ml100k"

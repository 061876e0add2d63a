# MovieLens-100K: the stand-in LLM, pretrained without user context (docs/results.md).
# OMP_NUM_THREADS=1 python train_llm.py configs/ml100k_gpt.py
exec(open("configs/synthetic_gpt.py").read())
out_dir = "out/ml100k-gpt"
dataset = "ml100k"
max_steps = 4000
min_lr = 3e-5
eval_interval = 1000

# MovieLens-100K: User-LLM, Full, from the stand-in LLM and the encoder (docs/results.md).
# OMP_NUM_THREADS=1 python train_llm.py configs/ml100k_llm.py    (LLM frozen: --strategy=enc)
exec(open("configs/synthetic_llm.py").read())
out_dir = "out/ml100k-llm"
dataset = "ml100k"
encoder_ckpt = "out/ml100k-enc/best.pt"
llm_ckpt = "out/ml100k-gpt/best.pt"
max_steps = 3000
eval_interval = 300

# MovieLens-1M: the stand-in LLM, pretrained without user context (docs/results.md).
# OMP_NUM_THREADS=1 python train_llm.py configs/ml1m_gpt.py
exec(open("configs/ml100k_gpt.py").read())
out_dir = "out/ml1m-gpt"
dataset = "ml1m"
max_steps = 6000

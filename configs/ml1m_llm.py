# MovieLens-1M: User-LLM, Full, from the stand-in LLM and the encoder (docs/results.md).
# OMP_NUM_THREADS=1 python train_llm.py configs/ml1m_llm.py    (LLM frozen: --strategy=enc)
exec(open("configs/ml100k_llm.py").read())
out_dir = "out/ml1m-llm"
dataset = "ml1m"
encoder_ckpt = "out/ml1m-enc/best.pt"
llm_ckpt = "out/ml1m-gpt/best.pt"
max_steps = 6000
eval_interval = 500

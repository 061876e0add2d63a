# MovieLens-100K, step 3: contextualize the stand-in LLM (configs/ml100k_gpt.py) with the MovieLens-100K encoder
# (configs/ml100k.py), the recipe of configs/synthetic_llm.py with one change: 1,500 steps, not 600, about one pass
# over the 97,171 training targets. The real user signal is weaker and spread over three times the titles, and 600
# steps (each title the answer about 23 times) lowered the GPT's validation loss per answer token only from 0.2876
# to 0.2828; 1,500 steps reached 0.2703 (seed 1337; README "User-LLM on MovieLens-100K").
# OMP_NUM_THREADS=1 python train_llm.py configs/ml100k_llm.py      (Enc: --strategy=enc)
exec(open("configs/synthetic_llm.py").read())
out_dir = "out/ml100k-llm"
dataset = "ml100k"
encoder_ckpt = "out/ml100k-enc/best.pt"
llm_ckpt = "out/ml100k-gpt/best.pt"
max_steps = 1500
eval_interval = 300

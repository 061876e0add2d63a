# MovieLens-100K, step 3: contextualize the stand-in LLM (configs/ml100k_gpt.py) with the MovieLens-100K encoder
# (configs/ml100k.py), the recipe of configs/synthetic_llm.py with one change: 3,000 steps, not 1,200, about two
# passes over the 97,171 training targets. The real user signal is weaker and spread over three times the titles:
# the GPT's validation loss per answer token, 0.2876 alone (seed 1337), was 0.2828 after 600 steps, 0.2703 after
# 1,500 and 0.2574 after 3,000, still falling; 3,000 beat 1,500 on validation on every seed, Full and Enc
# (README "User-LLM on MovieLens-100K").
# OMP_NUM_THREADS=1 python train_llm.py configs/ml100k_llm.py      (Enc: --strategy=enc)
exec(open("configs/synthetic_llm.py").read())
out_dir = "out/ml100k-llm"
dataset = "ml100k"
encoder_ckpt = "out/ml100k-enc/best.pt"
llm_ckpt = "out/ml100k-gpt/best.pt"
max_steps = 3000
eval_interval = 300

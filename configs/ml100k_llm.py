# MovieLens-100K, step 3: contextualize the stand-in LLM (configs/ml100k_gpt.py) with the MovieLens-100K encoder
# (configs/ml100k.py), the recipe of configs/synthetic_llm.py unchanged; only the dataset and checkpoints change.
# OMP_NUM_THREADS=1 python train_llm.py configs/ml100k_llm.py      (Enc: --strategy=enc)
exec(open("configs/synthetic_llm.py").read())
out_dir = "out/ml100k-llm"
dataset = "ml100k"
encoder_ckpt = "out/ml100k-enc/best.pt"
llm_ckpt = "out/ml100k-gpt/best.pt"

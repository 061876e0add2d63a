# MovieLens-20M favourite genre, Table 9 "FavGenre": GPT-2 with cross-attention, strategy Full.
# torchrun --nproc_per_node=8 train_llm.py configs/ml20m_fav.py
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/ml20m-fav-llm"
task = "fav"
strategy = "full"
batch_size = 1024
grad_accum = 16
max_steps = 5000
warmup_steps = 500

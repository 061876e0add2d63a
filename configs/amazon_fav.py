# Amazon Review Movies_and_TV favourite category, Table 9 "FavCat": GPT-2, cross-attention, Full.
# torchrun --nproc_per_node=8 train_llm.py configs/amazon_fav.py
exec(open("configs/amazon_next.py").read())
out_dir = "out/amazon-fav-llm"
task = "fav"
batch_size = 1024
grad_accum = 16
max_steps = 5000
warmup_steps = 500

# Google Local Review New York favourite category, Table 9 "FavCat": GPT-2, cross-attention, Full.
# torchrun --nproc_per_node=8 train_llm.py configs/google_fav.py
exec(open("configs/google_next.py").read())
out_dir = "out/google-fav-llm"
task = "fav"

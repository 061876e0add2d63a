# MovieLens-100K, step 2 of the offline pipeline (README "Real data: MovieLens-100K"): the stand-in LLM pretrained on
# the next-item task's text without user context (training targets only), as configs/synthetic_gpt.py does for the
# synthetic default. It runs 4,000 steps, not 2,000: its 1,682 real titles are three times the synthetic 500 and use
# 2,700 distinct words (the synthetic ones recombine 600), and after 1,000 steps the GPT cannot spell them yet (the
# catalogue's titles hold about half of its probability after the query; 92% after 4,000). A pretrained LLM knows the
# catalogue; this one has to learn it first. min_lr 3e-5 was measured here first: without user context the GPT's
# ranking is one fixed list, set by how well it estimates how often each title is watched; decayed only to 3e-4 that
# estimate follows the last few hundred batches (rank correlation with the training counts 0.944, 4 of the 10 most
# watched in its top 10); to 3e-5 it averages over many more (0.986, 7 of 10), and it ranks as most-popular does.
# (Those numbers: python eval.py --ckpt=<run>/best.pt --catalogue=True, seed 1337.)
# OMP_NUM_THREADS=1 python train_llm.py configs/ml100k_gpt.py      (experiments/ml100k.sh runs the whole pipeline)
exec(open("configs/synthetic_gpt.py").read())
out_dir = "out/ml100k-gpt"
dataset = "ml100k"
max_steps = 4000
min_lr = 3e-5  # as the synthetic one (kept explicit: it was measured here)
eval_interval = 1000

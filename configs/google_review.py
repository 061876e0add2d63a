# Google Local Review New York review generation, Table 9 "ReviewG": GPT-2, cross-attention, Full.
# torchrun --nproc_per_node=8 train_llm.py configs/google_review.py
exec(open("configs/google_next.py").read())
out_dir = "out/google-review-llm"
task = "review_gen"
max_answer_tokens = 128
batch_size = 1024
grad_accum = 32

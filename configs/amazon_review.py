# Amazon Review Movies_and_TV review generation, Table 9 "ReviewG": GPT-2, cross-attention, Full.
# torchrun --nproc_per_node=8 train_llm.py configs/amazon_review.py
exec(open("configs/amazon_next.py").read())
out_dir = "out/amazon-review-llm"
task = "review_gen"
max_answer_tokens = 128
batch_size = 2048
grad_accum = 32
max_steps = 5000
warmup_steps = 500

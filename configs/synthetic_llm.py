# The synthetic default, step 3: User-LLM, Full, cross-attention (docs/deviations.md).
# python train_llm.py configs/synthetic_llm.py
out_dir = "out/synthetic-llm"
dataset = "synthetic"
seq_len = 50
task = "next_item"
fusion = "xattn"
strategy = "full"
encoder_ckpt = "out/synthetic-enc/best.pt"
llm = "scratch"
llm_ckpt = "out/synthetic-gpt/best.pt"
n_layer = 2
n_head = 4
n_embd = 128
max_text_tokens = 512
batch_size = 64
max_steps = 1200
warmup_steps = 50
lr = 3e-4
min_lr = 3e-5
fusion_lr_mult = 10.0
eval_interval = 200
eval_examples = 500

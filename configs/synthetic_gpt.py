# The synthetic default, step 2: the stand-in LLM, pretrained without user context.
# python train_llm.py configs/synthetic_gpt.py
out_dir = "out/synthetic-gpt"
dataset = "synthetic"
seq_len = 50
task = "next_item"
fusion = "none"
strategy = "full"
llm = "scratch"
n_layer = 2
n_head = 4
n_embd = 128
max_text_tokens = 512
batch_size = 64
max_steps = 2000
warmup_steps = 50
lr = 3e-3
min_lr = 3e-5
eval_interval = 500
eval_examples = 500

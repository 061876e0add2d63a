# The embedded default on a laptop CPU: User-LLM (cross-attention, Enc strategy) on next-item prediction with a small
# from-scratch GPT (byte-level tokens), contextualized by the encoder pretrained by configs/synthetic_enc.py.
# python train_llm.py configs/synthetic_llm.py      (TextPrompt baseline: --fusion=none --strategy=full --text_events=10)
out_dir = "out/synthetic-llm"
dataset = "synthetic"
seq_len = 50
task = "next_item"
fusion = "xattn"
strategy = "enc"
encoder_ckpt = "out/synthetic-enc/best.pt"
llm = "scratch"
n_layer = 2
n_head = 4
n_embd = 128
block_size = 256
batch_size = 64
max_steps = 500
warmup_steps = 50
lr = 2e-3
min_lr = 2e-4
eval_interval = 250
eval_examples = 500

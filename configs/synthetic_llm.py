# The embedded default on a laptop CPU: User-LLM (gated cross-attention) on next-item prediction with a small
# from-scratch GPT (byte-level tokens), contextualized by the encoder pretrained by configs/synthetic_enc.py.
# python train_llm.py configs/synthetic_llm.py
# TextPrompt TP10: --fusion=none --text_events=10 --max_text_tokens=512
# Offline there is no pretrained LLM, so the GPT itself must learn: strategy Full. For Enc/Proj/LoRA, start from a
# trained GPT instead: --llm_ckpt=out/synthetic-llm-none/best.pt (the run with --fusion=none) --strategy=enc
# The tanh gates start at 0 (the untouched model is the plain GPT); gate_lr_mult lets them open within a short run.
out_dir = "out/synthetic-llm"
dataset = "synthetic"
seq_len = 50
task = "next_item"
fusion = "xattn"
strategy = "full"
encoder_ckpt = "out/synthetic-enc/best.pt"
llm = "scratch"
n_layer = 2
n_head = 4
n_embd = 128
max_text_tokens = 256
batch_size = 64
max_steps = 1000
warmup_steps = 50
lr = 3e-3
min_lr = 3e-4
gate_lr_mult = 30.0
eval_interval = 500
eval_examples = 500

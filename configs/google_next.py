# Google Local Review New York next item, Table 9 "NextItem": GPT-2, cross-attention, strategy Full.
# torchrun --nproc_per_node=8 train_llm.py configs/google_next.py
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/google-next-llm"
dataset = "google_ny"
encoder_ckpt = "out/google-enc/best.pt"
strategy = "full"
batch_size = 2048
grad_accum = 32
max_steps = 5000
warmup_steps = 500
weight_decay = 0.1

# MovieLens-20M next item: ml20m_enc.py with strategy LoRA (Sec 3.2.3).
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/ml20m-lora-llm"
strategy = "lora"
lora_rank = 8  # the paper's rank is lost in its text; ours

# The paper's main setting (Sec 4.2, Table 5): User-LLM on MovieLens-20M next-item prediction, GPT-2 contextualized by
# gated cross-attention, Enc strategy (LLM frozen; encoder + cross-attention trained), N = 50 events.
# torchrun --nproc_per_node=8 train_llm.py configs/ml20m_enc.py
# Siblings change one thing: ml20m_{full,lora,proj}.py (strategy), ml20m_softprompt.py, ml20m_perceiver.py,
# ml20m_tp50.py (TextPrompt), ml20m_ar50tp10.py. Optimisation values are ours, in App. C's form; not checked against it.
out_dir = "out/ml20m-enc-llm"
dataset = "ml20m"
seq_len = 50
task = "next_item"
fusion = "xattn"
strategy = "enc"
encoder_ckpt = "out/ml20m-enc/best.pt"
llm = "gpt2"
xattn_every = 1
max_text_tokens = 1024
batch_size = 128
max_steps = 20000
warmup_steps = 500
lr = 1e-4
min_lr = 1e-5
weight_decay = 0.01
eval_interval = 1000
eval_examples = 5000

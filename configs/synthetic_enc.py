# The embedded default on a laptop CPU: pretrain the User-LLM AR encoder on data/synthetic (python data.py first).
# python train_encoder.py configs/synthetic_enc.py        (Bert4Rec / DualEnc: add --kind=bert4rec / --kind=dual)
out_dir = "out/synthetic-enc"
dataset = "synthetic"
seq_len = 50
kind = "ar"
feature_dims = (64, 16, 16)
n_embd = 128
n_layer = 2
n_head = 4
dropout = 0.0
batch_size = 128
max_steps = 600
warmup_steps = 50
lr = 5e-3
min_lr = 5e-4
weight_decay = 0.1
eval_interval = 200
eval_examples = 1000

# MovieLens-1M: the AR encoder on one CPU thread (docs/results.md).
# python data.py --dataset=ml1m --raw_dir=data/raw/ml1m
# OMP_NUM_THREADS=1 python train_encoder.py configs/ml1m.py
out_dir = "out/ml1m-enc"
dataset = "ml1m"
seq_len = 50
kind = "ar"
seen_bias = True
feature_dims = (64, 16, 16)
n_embd = 64
n_layer = 2
n_head = 2
dropout = 0.1
batch_size = 256
max_steps = 4000
warmup_steps = 200
lr = 3e-3
min_lr = 3e-4
weight_decay = 0.1
eval_interval = 250
eval_examples = 0

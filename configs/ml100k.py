# MovieLens-100K: the AR encoder on one CPU thread (docs/results.md; values: docs/deviations.md).
# python data.py --dataset=ml100k --raw_dir=data/raw/ml100k
# OMP_NUM_THREADS=1 python train_encoder.py configs/ml100k.py
out_dir = "out/ml100k-enc"
dataset = "ml100k"
seq_len = 50
kind = "ar"
seen_bias = True
feature_dims = (64, 16, 16)
n_embd = 64
n_layer = 2
n_head = 2
dropout = 0.1
batch_size = 256
max_steps = 1000
warmup_steps = 100
lr = 3e-3
min_lr = 3e-4
weight_decay = 0.1
eval_interval = 100
eval_examples = 0

# MovieLens-20M: encoder pretraining (paper Sec 4.1, App. C).
# python data.py --dataset=ml20m --download=True
# torchrun --nproc_per_node=8 train_encoder.py configs/ml20m.py
out_dir = "out/ml20m-enc"
dataset = "ml20m"
seq_len = 50
kind = "ar"
feature_dims = (256, 32, 32)
n_embd = 256
n_layer = 4
n_head = 8
dropout = 0.1
batch_size = 1024
grad_accum = 8
max_steps = 30000
warmup_steps = 1000
lr = 1e-3
min_lr = 1e-4
weight_decay = 0.1
eval_interval = 1000
eval_examples = 20000

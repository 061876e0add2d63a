# Google Local Review New York: encoder pretraining, Table 9 "EncoderPretrain".
# python data.py --dataset=google_ny --download=True
# torchrun --nproc_per_node=8 train_encoder.py configs/google.py
exec(open("configs/ml20m.py").read())
out_dir = "out/google-enc"
dataset = "google_ny"
batch_size = 16384
grad_accum = 16
max_steps = 10000
warmup_steps = 1000
lr = 1e-4
min_lr = 1e-5
weight_decay = 0.1

# Amazon Review Movies_and_TV: encoder pretraining, Table 9 "EncoderPretrain".
# python data.py --dataset=amazon_movies --download=True
# torchrun --nproc_per_node=8 train_encoder.py configs/amazon.py
exec(open("configs/ml20m.py").read())
out_dir = "out/amazon-enc"
dataset = "amazon_movies"
batch_size = 12800
grad_accum = 16
max_steps = 7000
warmup_steps = 700
lr = 1e-4
min_lr = 1e-5
weight_decay = 0.1

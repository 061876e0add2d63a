# MovieLens-20M: encoder pretraining, paper Table 9 "EncoderPretrain" (docs/deviations.md: lr).
# python data.py --dataset=ml20m --download=True
# torchrun --nproc_per_node=8 train_encoder.py configs/ml20m.py
out_dir = "out/ml20m-enc"
dataset = "ml20m"
seq_len = 50
kind = "ar"
feature_dims = (256, 32, 32)  # the encoder's depth, widths and heads are lost in the text; ours
n_embd = 256
n_layer = 4
n_head = 8
dropout = 0.1
batch_size = 32768
grad_accum = 32
max_steps = 10000
warmup_steps = 1000  # "the first ? of training steps": the fraction is lost in the text; ours 10%
lr = 1e-3  # Table 9: 1e-1 (docs/deviations.md)
min_lr = 1e-4
weight_decay = 0.1
eval_interval = 1000
eval_examples = 20000

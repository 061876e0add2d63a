# Google Local Review New York: encoder pretraining (paper Sec 4.1, App. C).
# python data.py --dataset=google_ny --download=True
# torchrun --nproc_per_node=8 train_encoder.py configs/google.py
exec(open("configs/ml20m.py").read())
out_dir = "out/google-enc"
dataset = "google_ny"
max_steps = 20000

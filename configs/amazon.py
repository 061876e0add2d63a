# Amazon Review Movies_and_TV: encoder pretraining (paper Sec 4.1, App. C).
# python data.py --dataset=amazon_movies --download=True
# torchrun --nproc_per_node=8 train_encoder.py configs/amazon.py
exec(open("configs/ml20m.py").read())
out_dir = "out/amazon-enc"
dataset = "amazon_movies"
max_steps = 20000

# Amazon Review Movies_and_TV next item, Table 9 "NextItem": GPT-2, cross-attention, strategy Full.
# torchrun --nproc_per_node=8 train_llm.py configs/amazon_next.py
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/amazon-next-llm"
dataset = "amazon_movies"
encoder_ckpt = "out/amazon-enc/best.pt"
strategy = "full"
weight_decay = 0.1

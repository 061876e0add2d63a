# Google Local Review New York: favourite category (Sec 4.3.2), User-LLM, Enc.
# torchrun --nproc_per_node=8 train_llm.py configs/google_enc.py
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/google-fav-llm"
dataset = "google_ny"
task = "fav"
encoder_ckpt = "out/google-enc/best.pt"

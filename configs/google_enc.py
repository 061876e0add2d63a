# Google Local Review New York, favourite category (Sec 4.2, Table 5) with User-LLM cross-attention, Enc strategy.
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/google-fav-llm"
dataset = "google_ny"
task = "fav"
encoder_ckpt = "out/google-enc/best.pt"

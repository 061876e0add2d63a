# Amazon Review Movies_and_TV, review generation (Sec 4.2, Table 5) with User-LLM cross-attention, Enc strategy.
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/amazon-review-llm"
dataset = "amazon_movies"
task = "review_gen"
encoder_ckpt = "out/amazon-enc/best.pt"
max_answer_tokens = 128

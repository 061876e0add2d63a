# Amazon Review Movies_and_TV: review generation (Sec 4.2), User-LLM, Enc.
# torchrun --nproc_per_node=8 train_llm.py configs/amazon_enc.py
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/amazon-review-llm"
dataset = "amazon_movies"
task = "review_gen"
encoder_ckpt = "out/amazon-enc/best.pt"
max_answer_tokens = 128

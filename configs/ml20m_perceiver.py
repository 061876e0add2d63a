# MovieLens-20M next item: ml20m_enc.py with a Perceiver, 50 events -> 16 (Sec 4.5).
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/ml20m-perceiver-llm"
perceiver = True
n_latents = 16
perceiver_layers = 2  # the paper's depth and query width are lost in its text; ours

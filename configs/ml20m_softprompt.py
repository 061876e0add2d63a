# MovieLens-20M next item: ml20m_enc.py with a soft prompt instead of cross-attention.
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/ml20m-softprompt-llm"
fusion = "soft_prompt"

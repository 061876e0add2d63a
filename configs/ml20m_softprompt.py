# ml20m_enc.py with soft-prompt fusion instead of cross-attention (App. B).
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/ml20m-softprompt-llm"
fusion = "soft_prompt"

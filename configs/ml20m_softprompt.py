# MovieLens-20M next item: ml20m_enc.py with a soft prompt instead of cross-attention.
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/ml20m-softprompt-llm"
fusion = "soft_prompt"
max_text_tokens = 970  # GPT-2's 1,024 positions hold the prompt, the 4 task tokens and 50 events

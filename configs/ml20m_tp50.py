# MovieLens-20M next item: TextPrompt TP50, the last 50 events as text, GPT-2 Full.
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/ml20m-tp50-llm"
fusion = "none"
strategy = "full"
text_events = 50
encoder_ckpt = ""

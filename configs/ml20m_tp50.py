# The TextPrompt baseline TP50: no user encoder, the last 50 events as text in the prompt, GPT-2 fully fine-tuned.
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/ml20m-tp50-llm"
fusion = "none"
strategy = "full"
text_events = 50
encoder_ckpt = ""

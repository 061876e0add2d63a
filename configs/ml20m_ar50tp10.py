# MovieLens-20M next item: AR50TP10, the encoder over 50 events plus the last 10 as text.
exec(open("configs/ml20m_enc.py").read())
out_dir = "out/ml20m-ar50tp10-llm"
text_events = 10

# MovieLens-20M next item: TextPrompt TP100 (Fig. 3), GPT-2 Full. Its prompt + answer reach 1,252
# tokens on sampled ML-20M-shaped users: GPT-2's 1,024 positions are stretched to hold it
# (llm_positions: gpt2.stretch_positions, ours).
exec(open("configs/ml20m_tp50.py").read())
out_dir = "out/ml20m-tp100-llm"
text_events = 100
max_text_tokens = 1344
llm_positions = 1344

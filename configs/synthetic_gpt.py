# Step 2 of the offline pipeline (after data.py and configs/synthetic_enc.py): pretrain the LLM that User-LLM then
# contextualizes. The paper starts from a pretrained LLM; offline there is no GPT-2, so this small byte-level GPT
# stands in for it. It learns the next-item task's text without any user context: the query, then the title of an
# item some user watched next, for every TRAINING target (no validation or test target is in its text). So it knows
# the catalogue's titles and how often each is watched, as a pretrained LLM knows movies, and nothing about the user
# in front of it: its Recall is the no-context baseline.
# python train_llm.py configs/synthetic_gpt.py
out_dir = "out/synthetic-gpt"
dataset = "synthetic"
seq_len = 50
task = "next_item"
fusion = "none"
strategy = "full"
llm = "scratch"
n_layer = 2
n_head = 4
n_embd = 128
max_text_tokens = 512  # room for TextPrompt TP10 when it starts from this GPT
batch_size = 64
max_steps = 1000
warmup_steps = 50
lr = 3e-3
min_lr = 3e-4
eval_interval = 500
eval_examples = 500

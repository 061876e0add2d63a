"""
Contextualize an LLM with user embeddings (paper Sec 3.2, App. B) and fine-tune it on a task (Sec 4.2-4.5).

    python train_llm.py configs/synthetic_llm.py                  # User-LLM on the synthetic default, CPU
    python train_llm.py configs/ml20m_enc.py                      # the paper's main setting (GPT-2, GPU)
    torchrun --nproc_per_node=8 train_llm.py configs/ml20m_enc.py

The composition (UserLLM below): user encoder -> per-event embeddings (B, N, d_user) -> [Perceiver: (B, M, d_user)] ->
    fusion='xattn':        the GPT's gated cross-attention blocks attend to them (Sec 3.2.1), or
    fusion='soft_prompt':  they are projected to the LLM width and prepended to the text (App. B), or
    fusion='none':         no user embeddings: the TextPrompt baseline (text_events > 0 puts the history in the prompt).
AR50TP10 = an encoder fusion plus text_events=10. Strategies (Sec 3.2.3), what trains:
    full: LLM + encoder + fusion;  lora: LoRA adapters + encoder + fusion;  enc: encoder + fusion;  proj: fusion only.
The loss is on the answer tokens only; the LLM's input is a short fixed task query (the paper's is 32 tokens).
"""
import dataclasses
import os
import sys

import tiktoken
import torch
import torch.nn as nn

from common import (TRAIN_DEFAULTS, Selection, adamw, check_data, check_train_config, cleanup_distributed, configure,
                    evaluate_loss, load_checkpoint, load_weights, seeded_subset, setup_distributed,
                    to_device, train)
from data import UserData, batch_targets
from encoder import EncoderConfig, make_encoder
from model import GPT, GPTConfig, SoftPrompt
from perceiver import PerceiverResampler

DEFAULTS = dict(
    dataset="synthetic", data_dir="", seq_len=50, min_history=1,
    task="next_item",  # next_item | fav | review_gen
    fusion="xattn",  # xattn | soft_prompt | none
    strategy="enc",  # full | lora | enc | proj
    text_events=0,  # > 0: the last k events as text in the prompt (TextPrompt: TP10, TP50; with an encoder: AR50TP10)
    perceiver=False, n_latents=16, perceiver_layers=2,
    # the user encoder: a train_encoder.py checkpoint, or (encoder_ckpt='') a randomly initialised AR encoder of this shape
    encoder_ckpt="", enc_feature_dims=(64, 16, 16), enc_n_embd=128, enc_n_layer=2, enc_n_head=4,
    # the LLM: 'gpt2' (and -medium/-large/-xl, or a local Hugging Face folder) with the GPT-2 tokenizer, or 'scratch':
    # a small GPT from random init with a byte-level tokenizer, for offline runs
    # llm_ckpt: start from a train_llm.py checkpoint (see load_llm), e.g. the GPT of a run without user context
    llm="scratch", llm_ckpt="", n_layer=4, n_head=4, n_embd=128, block_size=512, dropout=0.0,
    xattn_every=1, xattn_dim=0, gate_lr_mult=1.0, lora_rank=8, lora_alpha=16.0, lora_mlp=False, n_task_tokens=4, max_answer_tokens=64,
    **TRAIN_DEFAULTS,
)

QUERY = {  # the task prompts: short and fixed, so the user context costs no extra text tokens (and bytes stay few)
    "next_item": "The user's next item:",
    "fav": "The user's favourite {feature}:",
    "review_gen": "The user's review of {title}, rated {rating}:",
}


def get_tokenizer(llm):
    """GPT-2's BPE (tiktoken r50k_base, the same as 'gpt2') for GPT-2 models; a byte-level encoding (256 byte tokens +
    <|endoftext|>) for the from-scratch GPT, which needs no vocabulary file and so works offline."""
    if llm == "scratch":
        return tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:
        raise SystemExit(f"cannot load the GPT-2 tokenizer (tiktoken r50k_base): {e}. Offline, set TIKTOKEN_CACHE_DIR "
                         f"to a folder holding its file (this repo's tests use ../shared/tiktoken)".splitlines()[0])


def unique_names(names):
    """Catalogue names made unique (an answer must name one item): a repeated title gets its id appended, "Heat [412]"."""
    counts = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [n if counts[n] == 1 else f"{n} [{i}]" for i, n in enumerate(names)]


class Prompter:
    """Turns examples into token sequences [prompt][answer][eot] with targets on the answer (and eot) only."""

    def __init__(self, d, tok, task, text_events, block_size, max_answer_tokens):
        if task not in QUERY:
            raise SystemExit(f"config: task must be one of {', '.join(QUERY)}, got '{task}'")
        self.d, self.tok, self.task, self.k, self.block_size = d, tok, task, text_events, block_size
        self.max_answer, self.eot = max_answer_tokens, tok.eot_token
        self.names = unique_names(d.genre_names if task == "fav" else d.item_titles)  # id -> answer text
        # the catalogue's answers, tokenized once (not in the batch hot path): " name" + eot
        self.answers = [a + [self.eot] for a in tok.encode_ordinary_batch([" " + n for n in self.names])]

    def prompts(self, targets):
        """The prompt tokens of examples given by their target's flat event index."""
        texts = []
        for t in targets:
            title, rating = self.d.item_titles[self.d.feats[0][t]], self.d.rating_values[self.d.feats[2][t]]
            history = f"History: {self.d.history_text(t, self.k)}\n" if self.k else ""
            texts.append(history + QUERY[self.task].format(feature=self.d.features[1], title=title, rating=f"{rating:g}"))
        return self.tok.encode_ordinary_batch(texts)

    def answer_tokens(self, targets, d_batch):
        """The answers: the target item's title, the favourite genre/category's name, or the user's review."""
        if self.task == "review_gen":
            reviews = self.tok.encode_ordinary_batch([" " + self.d.review(t) for t in targets])
            return [r[:self.max_answer] + [self.eot] for r in reviews]
        ids = d_batch["fav"] if self.task == "fav" else d_batch["target"][0]
        return [self.answers[i] for i in ids.tolist()]

    def __call__(self, d_batch, targets):
        """Add idx (B, T) and targets (B, T) -- -1 except on the answer tokens, right-padded -- to a data batch."""
        P, A = self.prompts(targets), self.answer_tokens(targets, d_batch)
        T = max(len(p) + len(a) for p, a in zip(P, A)) - 1
        if T > self.block_size:
            raise SystemExit(f"a prompt + answer of {T} tokens exceeds block_size={self.block_size}: raise block_size "
                             f"or lower text_events / max_answer_tokens")
        idx = torch.full((len(P), T), self.eot, dtype=torch.long)
        tgt = torch.full((len(P), T), -1, dtype=torch.long)
        for r, (p, a) in enumerate(zip(P, A)):
            seq = p + a
            idx[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            tgt[r, len(p) - 1:len(seq) - 1] = torch.tensor(a)  # position t predicts token t + 1
        d_batch["idx"], d_batch["targets"] = idx, tgt
        return d_batch


class UserLLM(nn.Module):
    """encoder -> [Perceiver] -> fusion -> GPT (encoder None for TextPrompt). forward(batch) -> the answer-token loss."""

    def __init__(self, encoder, llm, fusion, perceiver=None, soft_prompt=None):
        super().__init__()
        self.encoder, self.llm, self.fusion, self.perceiver, self.soft_prompt = encoder, llm, fusion, perceiver, soft_prompt

    def context(self, hist):
        """The keyword arguments that hand the user to the GPT (none for TextPrompt)."""
        if self.fusion == "none":
            return {}
        user, mask = self.encoder.embed(hist)  # (B, N, d_user), (B, N)
        if self.perceiver is not None:
            user, mask = self.perceiver(user, mask)  # (B, M, d_user): 50 events -> 16 latents
        if self.fusion == "soft_prompt":
            prefix, prefix_mask = self.soft_prompt(user, mask)  # (B, n_task + M, n_embd)
            return {"prefix": prefix, "prefix_mask": prefix_mask}
        return {"user": user, "user_mask": mask}

    def forward(self, batch):
        return self.llm(batch["idx"], batch["targets"], **self.context(batch["hist"]))[1]


def apply_strategy(model, strategy):
    """Sec 3.2.3: choose what trains. The fusion layers (cross-attention, soft-prompt projection, Perceiver) always do."""
    if strategy not in ("full", "lora", "enc", "proj"):
        raise SystemExit(f"config: strategy must be full, lora, enc or proj, got '{strategy}'")
    if model.fusion == "none" and strategy in ("enc", "proj"):
        raise SystemExit(f"config: strategy '{strategy}' trains user-embedding layers, but fusion='none' has none")
    for name, p in model.named_parameters():
        if name.startswith("llm.xattn") or name.startswith(("perceiver.", "soft_prompt.")):
            p.requires_grad = True  # fusion
        elif name.startswith("encoder."):
            p.requires_grad = strategy != "proj" and model.fusion != "none"
        elif "lora_" in name:
            p.requires_grad = strategy == "lora"
        else:  # the LLM itself
            p.requires_grad = strategy == "full"


def build_encoder(cfg, d, enc_cfg=None):
    """The user encoder: of a stored shape (enc_cfg, when rebuilding a checkpoint), pretrained (encoder_ckpt), or new."""
    if enc_cfg is None and cfg.encoder_ckpt:
        ckpt = load_checkpoint(cfg.encoder_ckpt)
        check_data(ckpt.get("data"), d.fingerprint(), cfg.encoder_ckpt)  # item ids must mean the same items
        encoder = make_encoder(EncoderConfig(**ckpt["encoder_config"]))
        load_weights(encoder, ckpt["model"], cfg.encoder_ckpt)
        return encoder
    if enc_cfg is None:
        enc_cfg = dict(vocab_sizes=tuple(d.vocab_sizes), feature_dims=cfg.enc_feature_dims, n_embd=cfg.enc_n_embd,
                       n_layer=cfg.enc_n_layer, n_head=cfg.enc_n_head, block_size=cfg.seq_len + 1)
    return make_encoder(EncoderConfig(**enc_cfg))


def build_model(cfg, d, tok, enc_cfg=None, llm_cfg=None):
    """The whole UserLLM from a train_llm.py config. eval.py passes the shapes stored in a checkpoint (enc_cfg,
    llm_cfg), so nothing is loaded that the checkpoint's weights would overwrite."""
    if cfg.fusion not in ("xattn", "soft_prompt", "none"):
        raise SystemExit(f"config: fusion must be xattn, soft_prompt or none, got '{cfg.fusion}'")
    encoder = build_encoder(cfg, d, enc_cfg) if cfg.fusion != "none" else None  # TextPrompt has no user encoder
    d_user = encoder.cfg.n_embd if encoder is not None else 0
    fusion = dict(d_user=d_user if cfg.fusion == "xattn" else 0, xattn_every=cfg.xattn_every, xattn_dim=cfg.xattn_dim,
                  lora_rank=cfg.lora_rank if cfg.strategy == "lora" else 0, lora_alpha=cfg.lora_alpha,
                  lora_mlp=cfg.lora_mlp, dropout=cfg.dropout)
    if llm_cfg is not None:
        llm = GPT(GPTConfig(**llm_cfg))
    elif cfg.llm == "scratch":  # positions for the soft prompt's task tokens and events, then the text
        llm = GPT(GPTConfig(block_size=cfg.block_size + cfg.n_task_tokens + cfg.seq_len, vocab_size=tok.n_vocab,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, **fusion))
    else:
        llm = GPT.from_pretrained(cfg.llm, **fusion)
    n_user = cfg.n_latents if cfg.perceiver else cfg.seq_len
    if cfg.fusion == "soft_prompt" and cfg.block_size + cfg.n_task_tokens + n_user > llm.config.block_size:
        raise SystemExit(f"config: text (block_size={cfg.block_size}) + soft prompt ({cfg.n_task_tokens} + {n_user}) "
                         f"exceed the LLM's {llm.config.block_size} positions")
    perceiver = PerceiverResampler(d_user, cfg.n_latents, cfg.perceiver_layers) if cfg.perceiver and cfg.fusion != "none" else None
    soft_prompt = SoftPrompt(d_user, llm.config.n_embd, cfg.n_task_tokens) if cfg.fusion == "soft_prompt" else None
    model = UserLLM(encoder, llm, cfg.fusion, perceiver, soft_prompt)
    apply_strategy(model, cfg.strategy)
    return model


def load_llm(model, path, d):
    """Start from a train_llm.py checkpoint. Its GPT must be whole (a base GPT weight missing is an error) and every
    weight it holds must have a place here (none is dropped unseen); layers it lacks (cross-attention, LoRA, a new
    encoder) keep their initialisation. So a run continues under another strategy, or, offline, the GPT trained without
    user context stands in for a pretrained LLM that already knows the catalogue's titles: the setting in which the
    paper compares Full/LoRA/Enc/Proj."""
    ckpt = load_checkpoint(path)
    check_data(ckpt.get("data"), d.fingerprint(), path)  # it learnt this catalogue's titles
    own, state = model.state_dict(), ckpt["model"]
    base = [k for k in own if k.startswith("llm.") and not k.startswith("llm.xattn.") and "lora_" not in k]
    if missing := [k for k in base if k not in state]:
        raise SystemExit(f"{path} does not hold this model's GPT: {len(missing)} weights missing, e.g. {missing[0]}")
    if unused := [k for k in state if k not in own]:
        raise SystemExit(f"{path} holds {len(unused)} weights this model has no place for, e.g. {unused[0]} (a LoRA "
                         f"run's adapters need strategy lora)")
    load_weights(model, state, path, strict=False)


def main(argv):
    cfg = configure(DEFAULTS, argv, __doc__)
    check_train_config(cfg)
    ctx = setup_distributed(cfg.device, cfg.dtype, cfg.seed)
    d = UserData(cfg.data_dir or os.path.join("data", cfg.dataset))
    tok = get_tokenizer(cfg.llm)
    model = build_model(cfg, d, tok)
    if cfg.llm_ckpt:
        load_llm(model, cfg.llm_ckpt, d)
    model.to(ctx.device)
    prompter = Prompter(d, tok, cfg.task, cfg.text_events, cfg.block_size, cfg.max_answer_tokens)
    if ctx.master:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"UserLLM: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained ({cfg.strategy}); config: {vars(cfg)}")
    train_targets = d.targets("train", cfg.min_history)
    val_targets = seeded_subset(d.targets("val"), cfg.eval_examples, cfg.seed)  # every rank: all of them

    def make_batch(ids):
        return to_device(prompter(d.batch(ids, cfg.seq_len), ids), ctx.device)

    # gate_lr_mult > 1 lets the tanh gates, which start at 0 (Sec 3.2.1), open in a short run (see configs/synthetic_llm.py)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), lr_mult={"gate_": cfg.gate_lr_mult})
    train(cfg, ctx, model, optimizer,
          global_batch=lambda step: batch_targets(train_targets, step, cfg.batch_size, cfg.seed),
          make_batch=make_batch, evaluate=lambda m: evaluate_loss(m, make_batch, val_targets, ctx),
          select=Selection("loss", higher_is_better=False),
          extra={"encoder_config": dataclasses.asdict(model.encoder.cfg) if model.encoder else None,
                 "llm_config": dataclasses.asdict(model.llm.config), "data": d.fingerprint()})
    cleanup_distributed(ctx)


if __name__ == "__main__":
    main(sys.argv[1:])

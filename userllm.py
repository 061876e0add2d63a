"""
User-LLM, composed (paper Sec 3.2, App. B): user encoder -> [Perceiver] -> fusion -> GPT, and the
training strategies of Sec 3.2.3. train_llm.py, eval.py and flops.py build their models here.

    python train_llm.py configs/synthetic_llm.py

    user events F x (B, N) -> encoder.embed -> (B, N, D) [-> PerceiverResampler -> (B, M, D)] ->
        fusion='xattn':        the GPT's gated cross-attention blocks attend to them (Sec 3.2.1)
        fusion='soft_prompt':  SoftPrompt projects them, prepended to the text (App. B)
        fusion='none':         no user embeddings: the TextPrompt baseline (text_events > 0 writes
                               the last events into the prompt)
    AR50TP10 = an encoder fusion + text_events=10.
Strategies, what trains: full: LLM + encoder + fusion; lora: LoRA adapters + encoder + fusion; enc:
encoder + fusion (LLM frozen); proj: fusion only. The fusion layers: cross-attention (or the soft
prompt's projection), the recency embedding, the Perceiver.

Dimension letters: B batch, N history events, M user embeddings the LLM sees, D the user-embedding
width.
"""
import types

import torch
import torch.nn as nn

from common import TRAIN_DEFAULTS, TRAIN_RULES, check_data, load_checkpoint, load_weights
from config import UserError, at_least, fraction, one_of
from encoder import EncoderConfig, history_positions, make_encoder
from gpt2 import load_gpt2, random_gpt2
from model import GPT, GPTConfig, Recency, SoftPrompt
from perceiver import PerceiverResampler

DEFAULTS = dict(  # every key of a train_llm.py config (configs/*_llm.py, ml20m_*.py, ...)
    dataset="synthetic", data_dir="", seq_len=50, min_history=1,
    task="next_item",  # next_item | fav | review_gen
    fusion="xattn",  # xattn | soft_prompt | none
    strategy="enc",  # full | lora | enc | proj
    text_events=0,  # > 0: the last k events as text in the prompt (TP10; with an encoder: AR50TP10)
    perceiver=False, n_latents=16, perceiver_layers=2,
    last_events=0,  # > 0: the LLM reads only the latest k event embeddings (truncation, Table 6)
    recency=True,  # ours (docs/deviations.md): a recency embedding on what the LLM reads
    # the user encoder: a train_encoder.py checkpoint, or (encoder_ckpt='') a random AR encoder of
    # this shape
    encoder_ckpt="", enc_feature_dims=(64, 16, 16), enc_n_embd=128, enc_n_layer=2, enc_n_head=4,
    # the LLM: 'gpt2' (or -medium, -large, -xl, or a Hugging Face folder) with GPT-2's tokenizer, or
    # 'scratch': a small GPT from random init with a byte-level tokenizer (offline). llm_ckpt: a
    # train_llm.py checkpoint to start from (load_llm), e.g. the stand-in GPT pretrained without
    # user context.
    # random_weights: llm='gpt2'... of GPT-2's shape with random weights, nothing downloaded
    # (rehearsals and cost counts; never a silent stand-in for the real weights)
    llm="scratch", llm_ckpt="", random_weights=False, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
    max_text_tokens=512,  # the longest prompt + answer in tokens (the soft prompt's come on top)
    llm_positions=0,  # > 1,024: GPT-2's position table stretched to this many (TP100/200; ours)
    # cross-attention blocks: before every k-th LLM block; attention and FFW widths (0: C and 4C)
    xattn_every=1, xattn_dim=0, xattn_ffw=0,
    lora_rank=8, lora_alpha=16.0, lora_mlp=False, n_task_tokens=4,
    gate_init=0.01,  # ours (docs/deviations.md): the gates' start before tanh (Flamingo: 0)
    fusion_lr_mult=1.0, gate_lr_mult=1.0, perceiver_lr_mult=1.0,  # ours: lr multipliers (docs/)
    max_answer_tokens=64,
    # ours, fusion='none' (data.Prompter): pack the batch's previous examples before each one; write
    # 0..mixed_history events before the query
    pack_examples=0, mixed_history=0,
    length_groups=0,  # ours (docs/deviations.md): > 0 sorts this many steps' batches by length
    **TRAIN_DEFAULTS,
)
RULES = dict(  # the values DEFAULTS' keys allow (config.configure checks them)
    seq_len=at_least(1), min_history=at_least(1), task=one_of("next_item", "fav", "review_gen"),
    fusion=one_of("xattn", "soft_prompt", "none"), strategy=one_of("full", "lora", "enc", "proj"),
    text_events=at_least(0), n_latents=at_least(1), perceiver_layers=at_least(1),
    last_events=at_least(0),
    enc_feature_dims=at_least(1), enc_n_embd=at_least(1), enc_n_layer=at_least(1),
    enc_n_head=at_least(1), n_layer=at_least(1), n_head=at_least(1), n_embd=at_least(1),
    dropout=fraction(), max_text_tokens=at_least(1), llm_positions=at_least(0),
    xattn_every=at_least(1), xattn_dim=at_least(0), xattn_ffw=at_least(0),
    lora_rank=at_least(1), lora_alpha=at_least(0.0), n_task_tokens=at_least(0),
    fusion_lr_mult=at_least(0.0), gate_lr_mult=at_least(0.0), perceiver_lr_mult=at_least(0.0),
    max_answer_tokens=at_least(1), pack_examples=at_least(0), mixed_history=at_least(0),
    length_groups=at_least(0), **TRAIN_RULES,
)


class UserLLM(nn.Module):
    """encoder -> [Perceiver] -> fusion -> GPT (no encoder for TextPrompt). forward(batch) -> the
    loss of the answer tokens."""

    def __init__(self, encoder, llm, fusion, perceiver=None, soft_prompt=None, recency=None,
                 last_events=0):
        super().__init__()
        self.encoder, self.llm, self.fusion = encoder, llm, fusion
        self.perceiver, self.soft_prompt, self.recency = perceiver, soft_prompt, recency
        self.last_events = last_events

    def context(self, hist):
        """The keyword arguments that hand the user to the GPT (none for TextPrompt)."""
        if self.fusion == "none":
            return {}
        user, mask = self.encoder.embed(hist)  # (B, N, D), (B, N)
        if self.last_events:  # the latest k only (histories are left-padded): truncation
            user, mask = user[:, -self.last_events:], mask[:, -self.last_events:]
        if self.recency is not None:
            user = self.recency(user, mask)  # which event is the latest: attention sees a set
        if self.perceiver is not None:
            user, mask = self.perceiver(user, mask)  # (B, M, D): 50 events -> 16 latents
        if self.fusion == "soft_prompt":
            prefix, prefix_mask = self.soft_prompt(user, mask)  # (B, n_task + M, n_embd)
            return {"prefix": prefix, "prefix_mask": prefix_mask}
        return {"user": user, "user_mask": mask}

    def forward(self, batch):
        return self.llm(batch["idx"], batch["targets"], **self.context(batch["hist"]))[1]

    def gates(self):
        """tanh of every cross-attention gate, {'attn0': ., 'ff0': ., ...} by block: how much of the
        user reaches the LLM (train_llm.py logs them)."""
        return {f"{kind}{i}": torch.tanh(getattr(block, f"gate_{kind}")).item()
                for i, block in (self.llm.xattn.items() if self.fusion == "xattn" else ())
                for kind in ("attn", "ff")}


def apply_strategy(model, strategy):
    """Sec 3.2.3: choose what trains. The fusion layers always do."""
    if strategy not in ("full", "lora", "enc", "proj"):
        raise UserError(f"config: strategy must be full, lora, enc or proj, got '{strategy}'")
    if model.fusion == "none" and strategy in ("enc", "proj"):
        raise UserError(f"config: strategy '{strategy}' trains user-embedding layers, but "
                        "fusion='none' has none")
    for name, p in model.named_parameters():
        if name.startswith(("llm.xattn", "perceiver.", "soft_prompt.", "recency.")):
            p.requires_grad = True  # fusion
        elif name.startswith("encoder."):
            # not its pretraining heads: the LLM's loss never reaches them (and DDP refuses an
            # unused one)
            p.requires_grad = (strategy != "proj" and model.fusion != "none"
                               and name.split(".")[1] not in model.encoder.heads)
        elif "lora_" in name:
            p.requires_grad = strategy == "lora"
        else:  # the LLM itself
            p.requires_grad = strategy == "full"


def build_encoder(cfg, d, enc_cfg=None):
    """The user encoder: of a stored shape (enc_cfg: rebuilding a checkpoint), pretrained
    (encoder_ckpt), or new (a random AR encoder)."""
    if enc_cfg is None and cfg.encoder_ckpt:
        ckpt = load_checkpoint(cfg.encoder_ckpt)
        if "llm_config" in ckpt:
            raise UserError(f"encoder_ckpt={cfg.encoder_ckpt} is a train_llm.py checkpoint, not an "
                            "encoder's (train_encoder.py)")
        check_data(ckpt["data"], d.fingerprint(), cfg.encoder_ckpt)  # the same item ids
        encoder = make_encoder(EncoderConfig(**ckpt["encoder_config"]))
        load_weights(encoder, ckpt["model"], cfg.encoder_ckpt)
        return encoder
    if enc_cfg is None:
        enc_cfg = dict(vocab_sizes=tuple(d.vocab_sizes), feature_dims=cfg.enc_feature_dims,
                       n_embd=cfg.enc_n_embd, n_layer=cfg.enc_n_layer, n_head=cfg.enc_n_head,
                       block_size=history_positions(cfg.seq_len))
    return make_encoder(EncoderConfig(**enc_cfg))


def build_model(cfg, d, tok, enc_cfg=None, llm_cfg=None):
    """The whole UserLLM of a train_llm.py config. eval.py passes the shapes a checkpoint stores
    (enc_cfg, llm_cfg), so that nothing is loaded that the checkpoint's weights would overwrite."""
    if cfg.fusion not in ("xattn", "soft_prompt", "none"):
        raise UserError(f"config: fusion must be xattn, soft_prompt or none, got '{cfg.fusion}'")
    if cfg.pack_examples and cfg.fusion != "none":  # a row's other examples belong to other users
        raise UserError(f"config: pack_examples={cfg.pack_examples} needs fusion='none', got "
                        f"'{cfg.fusion}'")
    if cfg.mixed_history and (cfg.fusion != "none" or cfg.text_events):  # it replaces text_events
        raise UserError(f"config: mixed_history={cfg.mixed_history} needs fusion='none' and "
                        f"text_events=0, got '{cfg.fusion}' and {cfg.text_events}")
    encoder = build_encoder(cfg, d, enc_cfg) if cfg.fusion != "none" else None  # TextPrompt: none
    d_user = encoder.cfg.n_embd if encoder is not None else 0
    fusion = dict(d_user=d_user if cfg.fusion == "xattn" else 0, xattn_every=cfg.xattn_every,
                  xattn_dim=cfg.xattn_dim, xattn_ffw=cfg.xattn_ffw,
                  lora_rank=cfg.lora_rank if cfg.strategy == "lora" else 0,
                  lora_alpha=cfg.lora_alpha, lora_mlp=cfg.lora_mlp, dropout=cfg.dropout,
                  gate_init=cfg.gate_init)
    if cfg.llm_positions and cfg.llm == "scratch":
        raise UserError(f"config: llm_positions={cfg.llm_positions} stretches GPT-2's positions; "
                        "the scratch GPT has max_text_tokens + soft prompt positions already")
    if llm_cfg is not None:
        llm = GPT(GPTConfig(**llm_cfg))
    elif cfg.random_weights:  # GPT-2's shape, random weights (llm='scratch' is refused there)
        llm = random_gpt2(cfg.llm, cfg.llm_positions, **fusion)
    elif cfg.llm == "scratch":  # positions for the soft prompt (task tokens, events), then the text
        positions = cfg.max_text_tokens + cfg.n_task_tokens + cfg.seq_len
        llm = GPT(GPTConfig(block_size=positions, vocab_size=tok.n_vocab, n_layer=cfg.n_layer,
                            n_head=cfg.n_head, n_embd=cfg.n_embd, **fusion))
    else:
        llm = load_gpt2(cfg.llm, cfg.llm_positions, **fusion)
    if cfg.last_events and (cfg.perceiver or cfg.fusion == "none"):
        raise UserError(f"config: last_events={cfg.last_events} truncates what the LLM reads of "
                        "the encoder: not with a Perceiver nor with fusion='none'")
    n_user = cfg.n_latents if cfg.perceiver else (cfg.last_events or cfg.seq_len)
    soft = cfg.n_task_tokens + n_user if cfg.fusion == "soft_prompt" else 0  # its positions
    if cfg.max_text_tokens + soft > llm.config.block_size:
        raise UserError(f"config: max_text_tokens={cfg.max_text_tokens}"
                        + (f" + soft prompt {soft}" if soft else "") + " exceeds the LLM's "
                        f"{llm.config.block_size} positions: lower it (and text_events), or "
                        f"llm_positions={cfg.max_text_tokens + soft} stretches GPT-2's")
    use_perceiver = cfg.perceiver and cfg.fusion != "none"
    n_events = history_positions(cfg.seq_len)
    perceiver = None
    if use_perceiver:
        perceiver = PerceiverResampler(d_user, cfg.n_latents, cfg.perceiver_layers,
                                       max_events=n_events)
    soft_prompt = (SoftPrompt(d_user, llm.config.n_embd, cfg.n_task_tokens)
                   if cfg.fusion == "soft_prompt" else None)
    use_recency = cfg.fusion == "xattn" and cfg.recency and not use_perceiver  # a Perceiver has one
    recency = Recency(n_events, d_user) if use_recency else None
    model = UserLLM(encoder, llm, cfg.fusion, perceiver, soft_prompt, recency, cfg.last_events)
    apply_strategy(model, cfg.strategy)
    return model


def load_llm(model, path, d):
    """Start from a train_llm.py checkpoint. Its GPT must be whole (a base GPT weight missing is an
    error) and every weight it holds must have a place here (none is dropped unseen); layers it
    lacks (cross-attention, LoRA, a new encoder) keep their initialisation. So a run continues under
    another strategy, or, offline, the GPT trained without user context stands in for a pretrained
    LLM that knows the catalogue's titles."""
    ckpt = load_checkpoint(path)
    if "llm_config" not in ckpt:
        raise UserError(f"llm_ckpt={path} is a train_encoder.py checkpoint, not an LLM's "
                        "(train_llm.py)")
    check_data(ckpt["data"], d.fingerprint(), path)  # it learnt this catalogue's titles
    own, state = model.state_dict(), ckpt["model"]
    base = [k for k in own
            if k.startswith("llm.") and not k.startswith("llm.xattn.") and "lora_" not in k]
    if missing := [k for k in base if k not in state]:
        raise UserError(f"{path} does not hold this model's GPT: {len(missing)} weights missing, "
                        f"e.g. {missing[0]}")
    if unused := [k for k in state if k not in own]:
        raise UserError(f"{path} holds {len(unused)} weights this model has no place for, e.g. "
                        f"{unused[0]} (a LoRA run's adapters need strategy lora)")
    load_weights(model, state, path, strict=False)


def from_checkpoint(ckpt, path, d, tok, device="cpu"):
    """(its config, the UserLLM in eval mode) of a train_llm.py checkpoint, on the shapes it
    stores."""
    cfg = types.SimpleNamespace(**{**DEFAULTS, **ckpt["config"]})  # a key added since: its default
    model = build_model(cfg, d, tok, ckpt["encoder_config"], ckpt["llm_config"]).to(device)
    load_weights(model, ckpt["model"], path)
    return cfg, model.eval()


def describe(c):
    """A results-table name for a train_llm.py config (a run with another seed gets its own)."""
    if c.fusion == "none":
        name = (f"TextPrompt TP{c.text_events}" if c.text_events else "no user context")
        name += f" ({c.strategy})"
        name += f" reading 0-{c.mixed_history} events" if c.mixed_history else ""
    else:
        name = {"xattn": "User-LLM", "soft_prompt": "soft prompt"}[c.fusion]
        name += f" N={c.seq_len} ({c.strategy})"
        name += f" +Perceiver{c.n_latents}" if c.perceiver else ""
        name += f" last {c.last_events}" if c.last_events else ""
        name += f" +TP{c.text_events}" if c.text_events else ""
        name += "" if c.encoder_ckpt else " random enc"
    name += " from a trained GPT" if c.llm_ckpt else ""
    name += f" [{c.task}]" if c.task != "next_item" else ""
    return name + (f" seed {c.seed}" if c.seed != TRAIN_DEFAULTS["seed"] else "")

"""
User-LLM, composed (paper Sec 3.2, App. B): user encoder -> [Perceiver] -> fusion -> GPT, the strategies of Sec 3.2.3,
and building it from a train_llm.py config or a checkpoint (GPT-2 weights included). train_llm.py, eval.py and
flops.py build their models here.

    user events F x (B, N) -> encoder.embed -> (B, N, D) [-> PerceiverResampler -> (B, M, D)] ->
        fusion='xattn':        the GPT's gated cross-attention blocks attend to them (Sec 3.2.1), or
        fusion='soft_prompt':  SoftPrompt projects them to the LLM width and prepends them to the text (App. B), or
        fusion='none':         no user embeddings: the TextPrompt baseline (text_events > 0 writes the history out).
    AR50TP10 = an encoder fusion plus text_events=10.
Strategies (Sec 3.2.3), what trains: full: LLM + encoder + fusion; lora: LoRA adapters + encoder + fusion;
enc: encoder + fusion (LLM frozen); proj: fusion only.

Dimension letters: B batch, N history events, M user embeddings the LLM sees, D the user-embedding width.
"""
import json
import mmap
import os
from pathlib import Path

import torch
import torch.nn as nn

from common import TRAIN_DEFAULTS, check_data, load_checkpoint, load_weights
from encoder import EncoderConfig, history_positions, make_encoder
from model import GPT, GPTConfig, Recency, SoftPrompt
from perceiver import PerceiverResampler
from sources import download

DEFAULTS = dict(  # every key of a train_llm.py config (configs/*_llm.py)
    dataset="synthetic", data_dir="", seq_len=50, min_history=1,
    task="next_item",  # next_item | fav | review_gen
    fusion="xattn",  # xattn | soft_prompt | none
    strategy="enc",  # full | lora | enc | proj
    text_events=0,  # > 0: the last k events as text in the prompt (TextPrompt: TP10, TP50; with an encoder: AR50TP10)
    perceiver=False, n_latents=16, perceiver_layers=2,
    recency=True,  # cross-attention: add a learned recency embedding to the events it attends to (model.Recency)
    # the user encoder: a train_encoder.py checkpoint, or (encoder_ckpt='') a random AR encoder of this shape
    encoder_ckpt="", enc_feature_dims=(64, 16, 16), enc_n_embd=128, enc_n_layer=2, enc_n_head=4,
    # the LLM: 'gpt2' (and -medium/-large/-xl, or a local Hugging Face folder) with the GPT-2 tokenizer, or 'scratch':
    # a small GPT from random init with a byte-level tokenizer, for offline runs. llm_ckpt: start from a train_llm.py
    # checkpoint (see load_llm), e.g. the GPT of a run without user context.
    llm="scratch", llm_ckpt="", n_layer=4, n_head=4, n_embd=128, dropout=0.0,
    max_text_tokens=512,  # the longest prompt + answer, in tokens (the GPT's positions add the soft prompt's)
    xattn_every=1, xattn_dim=0, lora_rank=8, lora_alpha=16.0, lora_mlp=False, n_task_tokens=4,
    fusion_lr_mult=1.0, gate_lr_mult=1.0,  # learning rates of the new layers and of their gates (train_llm.py)
    # the gates' start (before tanh). Not Flamingo's 0: behind a zero gate the cross-attention gets no gradient, the
    # gate's sign is noise, and each flip reverses what the cross-attention was pushed to learn, so on some seeds it
    # never opens (README). At 0.01 the sign is set from the first step; the LLM's loss at the start moves < 1e-4.
    gate_init=0.01,
    perceiver_lr_mult=1.0,  # the Perceiver's, x lr: it starts as a working resampler (perceiver.py), keep it one
    max_answer_tokens=64,
    pack_examples=0,  # fusion='none' only: the batch's pack_examples previous examples before each (data.Prompter)
    # fusion='none', text_events=0 only (pretraining the stand-in LLM): each training and validation example writes
    # out between 0 and mixed_history of its events before the query (data.Prompter); eval.py asks without a history
    mixed_history=0,
    **TRAIN_DEFAULTS,
)


class UserLLM(nn.Module):
    """encoder -> [Perceiver] -> fusion -> GPT (no encoder for TextPrompt). forward(batch) -> the answer-token loss."""

    def __init__(self, encoder, llm, fusion, perceiver=None, soft_prompt=None, recency=None):
        super().__init__()
        self.encoder, self.llm, self.fusion = encoder, llm, fusion
        self.perceiver, self.soft_prompt, self.recency = perceiver, soft_prompt, recency

    def context(self, hist):
        """The keyword arguments that hand the user to the GPT (none for TextPrompt)."""
        if self.fusion == "none":
            return {}
        user, mask = self.encoder.embed(hist)  # (B, N, d_user), (B, N)
        if self.recency is not None:
            user = self.recency(user, mask)  # which event is the latest: the cross-attention sees a set
        if self.perceiver is not None:
            user, mask = self.perceiver(user, mask)  # (B, M, d_user): 50 events -> 16 latents
        if self.fusion == "soft_prompt":
            prefix, prefix_mask = self.soft_prompt(user, mask)  # (B, n_task + M, n_embd)
            return {"prefix": prefix, "prefix_mask": prefix_mask}
        return {"user": user, "user_mask": mask}

    def forward(self, batch):
        return self.llm(batch["idx"], batch["targets"], **self.context(batch["hist"]))[1]

    def gates(self):
        """tanh of every cross-attention gate, {'attn0': ., 'ff0': ., ...} by block: how much of the user reaches the
        LLM (0 at the start; train_llm.py logs them)."""
        return {f"{kind}{i}": torch.tanh(getattr(block, f"gate_{kind}")).item()
                for i, block in (self.llm.xattn.items() if self.fusion == "xattn" else ())
                for kind in ("attn", "ff")}


def apply_strategy(model, strategy):
    """Sec 3.2.3: choose what trains. The fusion layers (cross-attention, soft-prompt projection, Perceiver) always
    do."""
    if strategy not in ("full", "lora", "enc", "proj"):
        raise SystemExit(f"config: strategy must be full, lora, enc or proj, got '{strategy}'")
    if model.fusion == "none" and strategy in ("enc", "proj"):
        raise SystemExit(f"config: strategy '{strategy}' trains user-embedding layers, but fusion='none' has none")
    for name, p in model.named_parameters():
        if name.startswith(("llm.xattn", "perceiver.", "soft_prompt.", "recency.")):
            p.requires_grad = True  # fusion
        elif name.startswith("encoder."):
            # not its pretraining heads: the LLM's loss never reaches them (and DDP stops at an unused trained one)
            p.requires_grad = (strategy != "proj" and model.fusion != "none"
                               and name.split(".")[1] not in model.encoder.heads)
        elif "lora_" in name:
            p.requires_grad = strategy == "lora"
        else:  # the LLM itself
            p.requires_grad = strategy == "full"


def build_encoder(cfg, d, enc_cfg=None):
    """The user encoder: of a stored shape (enc_cfg: rebuilding a checkpoint), pretrained (encoder_ckpt), or new."""
    if enc_cfg is None and cfg.encoder_ckpt:
        ckpt = load_checkpoint(cfg.encoder_ckpt)
        check_data(ckpt.get("data"), d.fingerprint(), cfg.encoder_ckpt)  # item ids must mean the same items
        encoder = make_encoder(EncoderConfig(**ckpt["encoder_config"]))
        load_weights(encoder, ckpt["model"], cfg.encoder_ckpt)
        return encoder
    if enc_cfg is None:
        enc_cfg = dict(vocab_sizes=tuple(d.vocab_sizes), feature_dims=cfg.enc_feature_dims, n_embd=cfg.enc_n_embd,
                       n_layer=cfg.enc_n_layer, n_head=cfg.enc_n_head, block_size=history_positions(cfg.seq_len))
    return make_encoder(EncoderConfig(**enc_cfg))


def build_model(cfg, d, tok, enc_cfg=None, llm_cfg=None):
    """The whole UserLLM from a train_llm.py config. eval.py passes the shapes stored in a checkpoint (enc_cfg,
    llm_cfg), so nothing is loaded that the checkpoint's weights would overwrite."""
    if cfg.fusion not in ("xattn", "soft_prompt", "none"):
        raise SystemExit(f"config: fusion must be xattn, soft_prompt or none, got '{cfg.fusion}'")
    if cfg.pack_examples and cfg.fusion != "none":  # a row's other examples belong to other users
        raise SystemExit(f"config: pack_examples={cfg.pack_examples} needs fusion='none', got '{cfg.fusion}'")
    if cfg.mixed_history and (cfg.fusion != "none" or cfg.text_events):  # it replaces text_events while training
        raise SystemExit(f"config: mixed_history={cfg.mixed_history} needs fusion='none' and text_events=0, got "
                         f"'{cfg.fusion}' and {cfg.text_events}")
    encoder = build_encoder(cfg, d, enc_cfg) if cfg.fusion != "none" else None  # TextPrompt has no user encoder
    d_user = encoder.cfg.n_embd if encoder is not None else 0
    fusion = dict(d_user=d_user if cfg.fusion == "xattn" else 0, xattn_every=cfg.xattn_every, xattn_dim=cfg.xattn_dim,
                  lora_rank=cfg.lora_rank if cfg.strategy == "lora" else 0, lora_alpha=cfg.lora_alpha,
                  lora_mlp=cfg.lora_mlp, dropout=cfg.dropout, gate_init=cfg.gate_init)
    if llm_cfg is not None:
        llm = GPT(GPTConfig(**llm_cfg))
    elif cfg.llm == "scratch":  # positions for the soft prompt's task tokens and events, then the text
        positions = cfg.max_text_tokens + cfg.n_task_tokens + cfg.seq_len
        llm = GPT(GPTConfig(block_size=positions, vocab_size=tok.n_vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                            n_embd=cfg.n_embd, **fusion))
    else:
        llm = load_gpt2(cfg.llm, **fusion)
    n_user = cfg.n_latents if cfg.perceiver else cfg.seq_len
    if cfg.fusion == "soft_prompt" and cfg.max_text_tokens + cfg.n_task_tokens + n_user > llm.config.block_size:
        raise SystemExit(f"config: text (max_text_tokens={cfg.max_text_tokens}) + soft prompt ({cfg.n_task_tokens} + "
                         f"{n_user}) exceed the LLM's {llm.config.block_size} positions")
    use_perceiver = cfg.perceiver and cfg.fusion != "none"
    n_events = history_positions(cfg.seq_len)
    perceiver = (PerceiverResampler(d_user, cfg.n_latents, cfg.perceiver_layers, max_events=n_events)
                 if use_perceiver else None)
    soft_prompt = SoftPrompt(d_user, llm.config.n_embd, cfg.n_task_tokens) if cfg.fusion == "soft_prompt" else None
    use_recency = cfg.fusion == "xattn" and cfg.recency and not use_perceiver  # the Perceiver has its own
    recency = Recency(n_events, d_user) if use_recency else None
    model = UserLLM(encoder, llm, cfg.fusion, perceiver, soft_prompt, recency)
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


# ----------------------------------------------------------------------------------------------------------------------
# GPT-2 weights: Hugging Face checkpoints loaded one-to-one into model.GPT (its parameter names are GPT-2's)

def load_gpt2(name_or_path, **overrides):
    """A GPT with the weights of gpt2 / gpt2-medium / gpt2-large / gpt2-xl (downloaded once, see hub_folder) or of a
    local Hugging Face-format folder (config.json + model.safetensors or pytorch_model.bin). `overrides` set the
    options that add new, freshly initialised modules (cross-attention, LoRA) or dropout; the architecture itself
    comes from config.json."""
    bad = sorted(set(overrides) - set(NEW_MODULE_OPTIONS))
    if bad:
        raise ValueError(f"load_gpt2: cannot override {bad}; allowed: {', '.join(NEW_MODULE_OPTIONS)}")
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        if name_or_path not in GPT2_NAMES:
            raise SystemExit(f"load_gpt2: {name_or_path!r} is neither a folder nor one of "
                             f"{', '.join(GPT2_NAMES)}")
        folder = hub_folder(name_or_path)
    hf = json.loads((folder / "config.json").read_text())
    if (hf.get("n_inner") not in (None, 4 * hf["n_embd"]) or hf.get("layer_norm_epsilon", 1e-5) != 1e-5
            or hf.get("activation_function", "gelu_new") != "gelu_new"):
        raise ValueError(f"{folder}/config.json: not a plain GPT-2 (n_inner, activation_function or "
                         "layer_norm_epsilon differ)")
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True, **overrides)
    model = GPT(config)
    ours = {k: v for k, v in model.state_dict().items()  # new modules keep their init; lm_head is tied to wte
            if "lora_" not in k and not k.startswith("xattn.") and k != "lm_head.weight"}
    theirs = {}
    for k, v in load_hf_weights(folder).items():
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # HF's causal-mask buffers; the tied head
        k = k if k.startswith("transformer.") else "transformer." + k  # GPT2Model saves without the prefix
        theirs[k] = v.t() if k.endswith(CONV1D_WEIGHTS) else v  # HF's Conv1D stores (in, out): transpose
    if set(ours) != set(theirs):
        raise ValueError(f"{folder}: not a GPT-2 checkpoint: missing {sorted(set(ours) - set(theirs))[:4]}, "
                         f"unexpected {sorted(set(theirs) - set(ours))[:4]}")
    with torch.no_grad():
        for k, v in theirs.items():
            if ours[k].shape != v.shape:
                raise ValueError(f"{folder}: {k} has shape {tuple(v.shape)}, expected {tuple(ours[k].shape)}")
            ours[k].copy_(v)  # state_dict tensors share storage with the parameters
    return model


GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
NEW_MODULE_OPTIONS = ("dropout", "d_user", "xattn_every", "xattn_dim", "xattn_heads", "gate_init", "lora_rank",
                      "lora_alpha", "lora_mlp")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file, without the safetensors package. The format: an 8-byte little-endian
    header length n, n bytes of JSON {name: {dtype, shape, data_offsets: [start, end]}} (offsets relative to the end of
    the header), then the raw little-endian tensor bytes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # read lazily; copy-on-write: writable for torch
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // torch.empty(0, dtype=dtype).element_size()
        flat = torch.empty(0, dtype=dtype)
        if count:  # frombuffer refuses count=0
            flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + start)
        out[name] = flat.view(info["shape"])
    return out


def load_hf_weights(folder):
    """The state dict of a Hugging Face checkpoint folder: model.safetensors, else pytorch_model.bin (weights only)."""
    if (folder / "model.safetensors").exists():
        return read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise SystemExit(f"{folder}: neither model.safetensors nor pytorch_model.bin found")


def hub_folder(name):
    """Local folder of the Hugging Face checkpoint `name`: $NANOUSERLLM_CACHE/<name> (default ~/.cache/nanouserllm),
    filled once from $NANOUSERLLM_HUB (default https://huggingface.co)/<name>/resolve/main/<file>. Offline and not yet
    cached: a one-line SystemExit saying which files to put where."""
    folder = Path(os.environ.get("NANOUSERLLM_CACHE", "~/.cache/nanouserllm")).expanduser() / name
    hub = os.environ.get("NANOUSERLLM_HUB", "https://huggingface.co")
    has_weights = (folder / "model.safetensors").exists() or (folder / "pytorch_model.bin").exists()
    for file, present in (("config.json", (folder / "config.json").exists()), ("model.safetensors", has_weights)):
        if not present:
            try:
                download(f"{hub}/{name}/resolve/main/{file}", folder / file)
            except (ImportError, OSError, SystemExit) as e:
                why = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise SystemExit(f"cannot download {name} ({why}); put config.json and model.safetensors from "
                                 f"https://huggingface.co/{name}/tree/main into {folder}") from None
    return folder

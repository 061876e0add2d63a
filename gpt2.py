"""
GPT-2's weights (paper Sec 4.2: User-LLM contextualizes a pretrained LLM): Hugging Face checkpoints
loaded one-to-one into model.GPT, whose parameter names are GPT-2's. No transformers package is
needed: the .safetensors format is read here, and a missing checkpoint is downloaded once from the
hub.

    python train_llm.py configs/ml20m_enc.py        (llm = "gpt2": loads it through load_gpt2)
    python train_llm.py configs/ml20m_enc.py --random_weights=True    # GPT-2's shape, no weights

Offline, with no copy in the cache, load_gpt2 says in one line which files to put where.
"""
import json
import mmap
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from config import UserError
from model import GPT, GPTConfig
from sources import download


def random_gpt2(name, positions=0, **overrides):
    """A GPT of GPT-2's shape (gpt2 ... gpt2-xl) with random weights: nothing is downloaded. For
    rehearsing paper-scale runs and counting their cost; asked for explicitly (train_llm.py:
    random_weights=True), never a silent stand-in for the real weights. positions: as load_gpt2."""
    if name not in GPT2_SHAPES:
        raise UserError(f"config: random_weights needs llm in {', '.join(GPT2_NAMES)}, "
                        f"got {name!r}")
    n_layer, n_head, n_embd = GPT2_SHAPES[name]
    return GPT(GPTConfig(block_size=max(1024, positions), vocab_size=50257, n_layer=n_layer,
                         n_head=n_head, n_embd=n_embd, **overrides))


def stretch_positions(wpe, n):
    """Position interpolation (ours; the paper's Sec 2.3 cites it, Chen et al. 2023a): a learned
    position table (P, C) resampled linearly to (n, C), row i of n reading what position
    i(P-1)/(n-1) read. GPT-2's 1,024 positions hold TextPrompt's TP50 but not TP100 or TP200 (prompt
    + answer up to 1,252 and 2,403 tokens on MovieLens-20M-shaped users); stretched, every prompt
    keeps positions the model has seen the like of, and fine-tuning adapts it (a new, randomly
    initialised tail would have to be learnt from nothing)."""
    return F.interpolate(wpe.t()[None].float(), size=n, mode="linear",
                         align_corners=True)[0].t().to(wpe.dtype)


def load_gpt2(name_or_path, positions=0, **overrides):
    """A GPT with the weights of gpt2 / gpt2-medium / gpt2-large / gpt2-xl (downloaded once:
    hub_folder) or of a local Hugging Face folder (config.json + model.safetensors or
    pytorch_model.bin). `overrides` set the options that add new, freshly initialised modules
    (cross-attention, LoRA) or dropout; the architecture itself comes from config.json. positions
    above the checkpoint's stretch its position table to that many (stretch_positions)."""
    bad = sorted(set(overrides) - set(NEW_MODULE_OPTIONS))
    if bad:
        raise ValueError(f"load_gpt2: cannot override {bad}; allowed: {NEW_MODULE_OPTIONS}")
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        if name_or_path not in GPT2_NAMES:
            raise UserError(f"load_gpt2: {name_or_path!r} is neither a folder nor one of "
                            f"{', '.join(GPT2_NAMES)}")
        folder = hub_folder(name_or_path)
    hf = json.loads((folder / "config.json").read_text())
    if (hf.get("n_inner") not in (None, 4 * hf["n_embd"])
            or hf.get("layer_norm_epsilon", 1e-5) != 1e-5
            or hf.get("activation_function", "gelu_new") != "gelu_new"):
        raise UserError(f"{folder}/config.json: not a plain GPT-2 (n_inner, activation_function or "
                        "layer_norm_epsilon differ)")
    config = GPTConfig(block_size=max(hf["n_positions"], positions), vocab_size=hf["vocab_size"],
                       n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True,
                       **overrides)
    model = GPT(config)
    ours = {k: v for k, v in model.state_dict().items()  # new modules keep their init; lm_head: wte
            if "lora_" not in k and not k.startswith("xattn.") and k != "lm_head.weight"}
    theirs = {}
    for k, v in load_hf_weights(folder).items():
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # HF's causal-mask buffers; the tied head
        k = k if k.startswith("transformer.") else "transformer." + k  # GPT2Model: no prefix
        theirs[k] = v.t() if k.endswith(CONV1D_WEIGHTS) else v  # HF's Conv1D stores (in, out)
    if positions > hf["n_positions"]:
        theirs["transformer.wpe.weight"] = stretch_positions(theirs["transformer.wpe.weight"],
                                                             positions)
    if set(ours) != set(theirs):
        raise UserError(f"{folder}: not a GPT-2 checkpoint: missing "
                        f"{sorted(set(ours) - set(theirs))[:4]}, unexpected "
                        f"{sorted(set(theirs) - set(ours))[:4]}")
    with torch.no_grad():
        for k, v in theirs.items():
            if ours[k].shape != v.shape:
                raise UserError(f"{folder}: {k} has shape {tuple(v.shape)}, expected "
                                f"{tuple(ours[k].shape)}")
            ours[k].copy_(v)  # state_dict tensors share storage with the parameters
    return model


GPT2_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
               "gpt2-xl": (48, 25, 1600)}  # (n_layer, n_head, n_embd); 1024 positions, 50,257 ids
GPT2_NAMES = tuple(GPT2_SHAPES)
NEW_MODULE_OPTIONS = ("dropout", "d_user", "xattn_every", "xattn_dim", "xattn_ffw", "xattn_heads",
                      "gate_init", "lora_rank", "lora_alpha", "lora_mlp")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file, without the safetensors package. The format: an
    8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets:
    [start, end]}} (offsets from the end of the header), then the raw little-endian tensor bytes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # lazy; copy-on-write: writable
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // torch.empty(0, dtype=dtype).element_size()
        flat = torch.empty(0, dtype=dtype)
        if count:  # frombuffer refuses count=0
            flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + start)
        out[name] = flat.view(info["shape"])
    return out


def load_hf_weights(folder):
    """The state dict of a Hugging Face checkpoint folder: model.safetensors, else pytorch_model.bin
    (weights only)."""
    if (folder / "model.safetensors").exists():
        return read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{folder}: neither model.safetensors nor pytorch_model.bin found")


def hub_folder(name):
    """Local folder of the Hugging Face checkpoint `name`: $NANOUSERLLM_CACHE/<name> (default
    ~/.cache/nanouserllm), filled once from $NANOUSERLLM_HUB (default https://huggingface.co)
    /<name>/resolve/main/<file>. Offline and not yet cached: a UserError saying which files to put
    where."""
    folder = Path(os.environ.get("NANOUSERLLM_CACHE", "~/.cache/nanouserllm")).expanduser() / name
    hub = os.environ.get("NANOUSERLLM_HUB", "https://huggingface.co")
    has_weights = (folder / "model.safetensors").exists() or (folder / "pytorch_model.bin").exists()
    for file, present in (("config.json", (folder / "config.json").exists()),
                          ("model.safetensors", has_weights)):
        if not present:
            try:
                download(f"{hub}/{name}/resolve/main/{file}", folder / file)
            except (ImportError, OSError, UserError) as e:
                why = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UserError(f"cannot download {name} ({why}); put config.json and "
                                f"model.safetensors from https://huggingface.co/{name}/tree/main "
                                f"into {folder} (or, to rehearse without them, "
                                "--random_weights=True)") from None
    return folder

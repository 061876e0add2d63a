"""Test setup: the GPT-2 tokenizer file ships in ../shared/tiktoken (no network here); point tiktoken at it."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIKTOKEN_DIR = ROOT.parent / "shared" / "tiktoken"
sys.path.insert(0, str(ROOT))
if TIKTOKEN_DIR.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_DIR))

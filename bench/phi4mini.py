"""A randomly initialised model of Phi-4-mini-instruct's exact shape, saved once to local disk.

The real weights cannot be downloaded on the GPU machine; for throughput and memory only the
shape matters (3,836,021,760 parameters). The tokenizer is OpenAI's o200k_base, the
vocabulary Phi-4-mini's tokenizer is built on (bench/build_o200k_tokenizer.py makes it), so
Code Alpaca examples get the token counts they would get with the real model.

    python bench/phi4mini.py --tokenizer /tmp/o200k_tok /tmp/phi4mini_random
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config

END_OF_TEXT = 199999  # o200k_base's <|endoftext|>: Phi-4-mini's BOS, EOS and padding id


def phi4mini_config() -> Phi3Config:
    """microsoft/Phi-4-mini-instruct's architecture (its config.json, without rope scaling)."""
    return Phi3Config(
        vocab_size=200064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=24,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        partial_rotary_factor=0.75,
        rms_norm_eps=1e-5,
        pad_token_id=END_OF_TEXT,
        bos_token_id=END_OF_TEXT,
        eos_token_id=END_OF_TEXT,
    )


def ensure_model(path: Path, tokenizer_dir: Path, config: Phi3Config | None = None) -> float:
    """Create and save the model at `path` unless it is there; returns the seconds spent."""
    if (path / "config.json").is_file():
        return 0.0
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config or phi4mini_config(), dtype=torch.bfloat16)
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)
    staging.rename(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="model directory to create")
    parser.add_argument("--tokenizer", type=Path, required=True, help="o200k tokenizer directory")
    args = parser.parse_args()
    seconds = ensure_model(args.path, args.tokenizer)
    print(f"{args.path}: " + (f"created in {seconds:.1f} s" if seconds else "already there"))


if __name__ == "__main__":
    main()

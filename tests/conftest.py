"""Shared fixtures: a tiny random Phi3 model (Phi-4-mini's module names) and its tokenizer.

Everything is built offline in a second or two, so tests never need the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

# Flower creates messages inside a running app, which sets the run identity;
# tests that build server messages outside one need it set.
TaskIdentity.run_id = 1
TaskIdentity.node_id = 0
TaskIdentity.task_id = 1

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CODE_ALPACA_2K = SHARED_DATA / "code_alpaca_2k.jsonl"

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that completes it.",
    "### Instruction:\nWrite a Python function that adds two numbers.\n### Response:\n",
    "def add(a, b):\n    return a + b\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (let i = 0; i < n; i++) { console.log(i); }",
    "SELECT name FROM users WHERE age > 30;",
]


def tiny_run_overrides(model_dir: Path, data: Path, results_dir: Path, **extra) -> dict:
    """Run config for a Flower run of the tiny model on CPU that takes seconds a round."""
    return {
        "model.name": str(model_dir),
        "model.quantization": 0,
        "model.gradient-checkpointing": False,
        "static.dataset.name": str(data),
        "train.seq-length": 96,
        "train.training-arguments.per-device-train-batch-size": 2,
        "train.training-arguments.max-steps": 2,
        "train.training-arguments.optim": "adamw_torch",
        "train.training-arguments.bf16": False,
        "results.dir": str(results_dir),
        **extra,
    }


def write_addition_data(path: Path, rows: int) -> Path:
    """A Code Alpaca-format .jsonl of `rows` one-line Python functions, for Flower runs."""
    path.write_text("".join(
        json.dumps({"instruction": f"Return x plus {i}.", "input": "",
                    "output": f"def f(x):\n    return x + {i}\n"}) + "\n"
        for i in range(rows)
    ))  # fmt: skip
    return path


def write_run_config(path: Path, overrides: dict) -> Path:
    """`overrides` as a TOML file for `--config` (flat, quoted keys)."""
    path.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in overrides.items()))
    return path


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_tiny_model_dir(path: Path) -> Path:
    """Save a tiny random Phi3 causal LM plus tokenizer to `path`."""
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    tokenizer = build_tiny_tokenizer()
    config = Phi3Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-phi3"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def code_alpaca_2k() -> Path:
    if not CODE_ALPACA_2K.is_file():
        pytest.skip(f"shared data absent: {CODE_ALPACA_2K} (the Code Alpaca 2k pilot set)")
    return CODE_ALPACA_2K

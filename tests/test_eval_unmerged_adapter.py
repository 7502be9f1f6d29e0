"""Generation with an unmerged adapter (the path a 4-bit base takes) matches the merged model."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedcoder.evaluation import GenerationSettings
from fedcoder.evaluation.generation import Generator
from fedcoder.evaluation.tasks import Problem

PROMPTS = ["def add(a, b):", "def fib(n):\n    if n < 2:", "SELECT name FROM users"]


def _problem(prompt: str) -> Problem:
    return Problem("humaneval", prompt, prompt, "", "", ("\n\n",), prompt)


@pytest.mark.parametrize("use_dora", [True, False])
def test_unmerged_adapter_generates_what_the_merged_model_does(tiny_model_dir, use_dora):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(
        r=4, target_modules=["qkv_proj", "o_proj"], use_dora=use_dora, init_lora_weights=False
    )
    unmerged = get_peft_model(base, config).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    settings = GenerationSettings(greedy=True, max_length=40, batch_size=3)
    problems = [_problem(p) for p in PROMPTS]
    # Twice unmerged: the DoRA cache of the first call must not leak into the second.
    first = Generator(unmerged, tokenizer, settings)(problems)
    again = Generator(unmerged, tokenizer, settings)(problems)
    merged = Generator(unmerged.merge_and_unload(), tokenizer, settings)(problems)
    assert first == again == merged
    assert any(text for [text] in first)

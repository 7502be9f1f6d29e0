"""Validation during training: MBPP's validation split only, scored as `fedcoder eval` does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcoder.config import RunConfig
from fedcoder.evaluation import EvalError
from fedcoder.evaluation.data import load_problems
from fedcoder.evaluation.generation import Generator, dora_caching, load_model
from fedcoder.evaluation.settings import GenerationSettings
from fedcoder.model import (
    adapter_state,
    initial_adapter,
    set_adapter_state,
)
from fedcoder.results import RunDirectory
from fedcoder.validation import Validator, score_validation

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
VALIDATION_IDS = [str(i) for i in range(511, 601)]


@pytest.fixture(scope="module")
def mbpp_rows() -> dict[str, dict]:
    path = DATA_DIR / "mbpp.jsonl"
    if not path.is_file():
        pytest.skip(f"shared data absent: {path} (MBPP, all 974 problems)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {str(row["task_id"]): row for row in rows}


def _config(model: Path | str = "unused", **validation) -> RunConfig:
    flat = {
        "model.name": str(model),
        "model.quantization": 0,
        "train.training-arguments.bf16": False,
        "validation.data-dir": str(DATA_DIR),
    }
    flat.update({f"validation.{key.replace('_', '-')}": value for key, value in validation.items()})
    return RunConfig.from_flat(flat)


def test_validation_split_never_selects_test_problems(mbpp_rows, tmp_path):
    validator = Validator(_config(every_rounds=1, num_problems=90), "unused")
    assert [p.problem_id for p in validator.problems] == VALIDATION_IDS
    assert all(p.task == "mbpp-validation" for p in validator.problems)
    test_ids = {p.problem_id for p in load_problems("mbpp", DATA_DIR)}
    assert test_ids == {str(i) for i in range(11, 511)} and test_ids.isdisjoint(VALIDATION_IDS)
    # A file without the validation problems is refused; nothing else stands in for them.
    no_validation = [row for tid, row in mbpp_rows.items() if tid not in VALIDATION_IDS]
    (tmp_path / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in no_validation))
    with pytest.raises(EvalError, match="0 mbpp-validation problems"):
        load_problems("mbpp-validation", tmp_path)


def test_reference_solutions_score_one(mbpp_rows):
    problems = load_problems("mbpp-validation", DATA_DIR)

    def reference(chunk):
        return [[mbpp_rows[p.problem_id]["code"]] for p in chunk]

    result = score_validation(reference, problems)
    assert result["pass@1"] == 1.0
    assert result["passed"] == result["n_problems"] == 90
    assert result["passed_ids"] == VALIDATION_IDS
    # and wrong answers score 0 through the same path
    wrong = score_validation(lambda chunk: [["def f():\n    pass\n"] for _ in chunk], problems[:10])
    assert wrong["pass@1"] == 0.0 and wrong["status_counts"] == {"failed": 10}


def test_validator_scores_each_adapter_it_is_given(mbpp_rows, tiny_model_dir):
    config = _config(tiny_model_dir, every_rounds=1, num_problems=3, max_new_tokens=4)
    validator = Validator(config, str(tiny_model_dir))
    assert validator.model is None  # nothing is loaded before the first score
    first = initial_adapter(config.model, seed=0)
    result = validator.score(first)
    json.dumps(result)  # goes into metrics.json as it is
    assert 0.0 <= result["pass@1"] <= 1.0 and result["n_problems"] == 3
    assert set(result["passed_ids"]) <= {"511", "512", "513"}
    assert sum(result["status_counts"].values()) == 3
    assert result["model_load_seconds"] > 0
    model = validator.model
    for key, value in adapter_state(model).items():
        assert torch.equal(value, first[key])

    second = {key: value + 0.25 for key, value in first.items()}
    again = validator.score(second)
    assert validator.model is model and again["model_load_seconds"] == 0.0  # loaded once
    for key, value in adapter_state(model).items():
        assert torch.equal(value, second[key])


def test_dora_caching_never_reuses_the_previous_adapter(mbpp_rows, tiny_model_dir):
    config = _config(tiny_model_dir, every_rounds=1, num_problems=1, max_new_tokens=1)
    assert config.model.lora.use_dora
    validator = Validator(config, str(tiny_model_dir))
    validator.score(initial_adapter(config.model, seed=0))
    model = validator.model  # as the validator built it
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    first = {key: value + 0.1 for key, value in adapter_state(model).items()}
    second = {key: value + 0.3 for key, value in first.items()}
    set_adapter_state(model, first)
    with dora_caching(model), torch.inference_mode():
        cached_first = model(ids).logits
    set_adapter_state(model, second)
    with dora_caching(model), torch.inference_mode():
        cached_second = model(ids).logits
    with torch.inference_mode():
        uncached_second = model(ids).logits
    assert torch.allclose(cached_second, uncached_second, atol=1e-5)
    assert not torch.allclose(cached_first, cached_second, atol=1e-3)


def test_max_new_tokens_caps_each_completion(mbpp_rows, tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    problems = load_problems("mbpp-validation", DATA_DIR)[:3]
    prompt_lengths = [len(tokenizer(p.prompt)["input_ids"]) for p in problems]

    def new_tokens(**settings) -> list[int]:
        generator = Generator(model, tokenizer, GenerationSettings(greedy=True, **settings))
        return [
            len(tokenizer(p.prompt + c)["input_ids"]) - n
            for p, n, [c] in zip(problems, prompt_lengths, generator(problems), strict=True)
        ]

    # +1: re-tokenizing may split a merge at the prompt/completion boundary
    assert all(n <= 5 + 1 for n in new_tokens(max_new_tokens=5))
    # Random weights rarely emit EOS: without the cap each runs on to its budget (>= 20).
    assert all(n > 10 for n in new_tokens(max_length=max(prompt_lengths) + 20))


def _green_pixels(png: Path) -> int:
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[..., :3]
    tab_green = np.array([0x2C, 0xA0, 0x2C]) / 255
    return int((np.abs(rgb - tab_green).max(axis=-1) < 0.05).sum())


def test_loss_plot_shows_validation_pass_at_1(tmp_path):
    config = RunConfig.from_flat({"results.dir": str(tmp_path), "results.run-name": "plot"})
    run, _ = RunDirectory.open(config)
    run.record_round({"round": 1, "train_loss": 1.2})
    png = run.path / "train_loss.png"
    assert png.is_file() and _green_pixels(png) == 0
    run.record_round({"round": 2, "train_loss": 1.0, "validation": {"pass@1": 0.3}})
    run.record_round({"round": 3, "train_loss": 0.9, "validation": {"pass@1": 0.4}})
    assert _green_pixels(png) > 100  # the pass@1 curve, its markers and its legend entry

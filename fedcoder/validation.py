"""Scoring the global adapter during training: greedy pass@1 on MBPP's validation split.

Every `validation.every-rounds` rounds the server generates completions with
the current global adapter for the first `validation.num-problems` problems of
MBPP's validation split (task_id 511-600; `fedcoder.evaluation.data` keeps the
test split 11-510 out by id) and runs them in the sandbox. Prompts, stop
strings and programs are those of `fedcoder eval --tasks mbpp-validation`;
decoding is greedy, so the score depends on the adapter alone and rounds can
be compared.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from fedcoder.config import RunConfig
from fedcoder.evaluation.data import load_problems
from fedcoder.evaluation.generation import Generator
from fedcoder.evaluation.harness import CompletionSource, scored_chunks
from fedcoder.evaluation.report import task_scores
from fedcoder.evaluation.settings import GenerationSettings
from fedcoder.evaluation.tasks import Problem
from fedcoder.model import add_adapter, load_base_model, set_adapter_state
from fedcoder.sandbox import Limits

TASK = "mbpp-validation"
# Problems per chunk: the sandbox scores one chunk while the next is generated.
CHUNK = 32


class Validator:
    """Scores adapters with one base model, loaded by the first `score` and then kept."""

    def __init__(self, config: RunConfig, base_model: str) -> None:
        """`base_model` is the model to load (a name or an already resolved path)."""
        self.settings = config.validation
        # Inference only: no k-bit training preparation, and no gradient
        # checkpointing, which would switch off the KV cache.
        self.model_settings = dataclasses.replace(
            config.model, name=base_model, gradient_checkpointing=False
        )
        self.dtype = torch.bfloat16 if config.train.bf16 else torch.float32
        self.generation = GenerationSettings(
            greedy=True, max_new_tokens=self.settings.max_new_tokens
        )
        self._generator: Generator | None = None

    @functools.cached_property
    def problems(self) -> tuple[Problem, ...]:
        """The problems scored; reading them early checks that the data is there."""
        data_dir = Path(self.settings.data_dir) if self.settings.data_dir else None
        return load_problems(TASK, data_dir)[: self.settings.num_problems]

    @property
    def model(self) -> PeftModel | None:
        """The adapter-wrapped base model, once the first `score` has loaded it."""
        return self._generator.model if self._generator is not None else None

    def score(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """pass@1 of the base model with adapter `state` (PEFT key names).

        Returns what metrics.json records: `pass@1`, `pass@1_stderr`, `passed`,
        `n_problems`, `status_counts`, `passed_ids`, `model_load_seconds` and
        `seconds` (the whole call).
        """
        started = time.perf_counter()
        problems = self.problems
        load_seconds = self._load()
        # The generator turns on PEFT's DoRA caching for each call and clears it
        # first, so nothing computed for an earlier adapter is reused.
        set_adapter_state(self._generator.model, state)
        result = score_validation(self._generator, problems)
        return {
            **result,
            "model_load_seconds": load_seconds,
            "seconds": time.perf_counter() - started,
        }

    def _load(self) -> float:
        """Load the base model and its adapter once; the seconds it took now."""
        if self._generator is not None:
            return 0.0
        started = time.perf_counter()
        settings = self.model_settings
        base, tokenizer = load_base_model(
            settings.name,
            quantization=settings.quantization,
            dtype=self.dtype,
            attn_implementation=settings.attn_implementation,
        )
        # Left unmerged: merging into a bf16 or quantized base and unmerging
        # for the next adapter would change the base weights a little each time.
        model = add_adapter(base, settings, training=False)
        model.eval()
        self._generator = Generator(model, tokenizer, self.generation)
        return time.perf_counter() - started


def score_validation(
    source: CompletionSource, problems: Sequence[Problem], limits: Limits = Limits()
) -> dict[str, Any]:
    """Score `source`'s completions for `problems` in the sandbox, with a progress bar."""
    samples: dict[str, list[dict[str, Any]]] = {p.problem_id: [] for p in problems}
    with tqdm(total=len(problems), desc="validation", unit="problem") as bar:
        for records in scored_chunks(source, problems, "completion", limits, None, CHUNK):
            for record in records:
                samples[record["problem_id"]].append(record)
            bar.update(len({r["problem_id"] for r in records}))
    scores = task_scores(list(samples.values()))
    passed = [pid for pid, runs in samples.items() if any(r["status"] == "passed" for r in runs)]
    return {
        "pass@1": scores["pass@1"],
        "pass@1_stderr": scores["pass@1_stderr"],
        "passed": len(passed),
        "n_problems": scores["n_problems"],
        "status_counts": scores["status_counts"],
        "passed_ids": passed,
    }

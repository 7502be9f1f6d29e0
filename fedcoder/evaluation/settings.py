"""How completions are generated: the knobs of a run, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from fedcoder.evaluation.errors import EvalError
from fedcoder.evaluation.tasks import MODES, Mode


@dataclass(frozen=True)
class GenerationSettings:
    """Defaults are the FlowerTune leaderboard's: one sample at T=0.2, top-p 0.95, seed 0."""

    mode: Mode = "completion"
    n_samples: int = 1
    greedy: bool = False
    temperature: float = 0.2
    top_p: float = 0.95
    seed: int = 0
    max_length: int | None = None  # prompt + new tokens; None: each task's own (1024, MBPP 2048)
    max_new_tokens: int | None = None  # a further cap on generated tokens; None: none
    batch_size: int = 8  # sequences per forward pass
    cuda_graphs: bool = True  # replay each decoding step from a CUDA graph (GPU only)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EvalError(f"unknown mode '{self.mode}' (choose from {', '.join(MODES)})")
        if self.n_samples < 1 or self.batch_size < 1:
            raise EvalError("--n-samples and --batch-size must be at least 1")
        if self.greedy and self.n_samples > 1:
            raise EvalError("greedy decoding gives identical samples; use --n-samples 1")
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise EvalError("sampling needs --temperature > 0 and 0 < --top-p <= 1")
        if self.max_length is not None and self.max_length < 2:
            raise EvalError("--max-length must be at least 2 tokens")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EvalError("--max-new-tokens must be at least 1")

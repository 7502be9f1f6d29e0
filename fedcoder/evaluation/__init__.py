"""Code evaluation: HumanEval, MBPP and MultiPL-E C++/JavaScript, scored by pass@k.

    from fedcoder.evaluation import evaluate, score_completions

    evaluate("builtin:smollm2-135m-instruct", out_dir="results/eval", limit=20)
    score_completions("completions.jsonl", tasks=["humaneval"], out_dir="results/scored")

Both write samples.jsonl, results.json and results.md to out_dir and return
the results.json content. `fedcoder eval` is the same from the command line.
"""

from fedcoder.evaluation.errors import EvalError
from fedcoder.evaluation.harness import evaluate, score_completions
from fedcoder.evaluation.passk import pass_at_k
from fedcoder.evaluation.settings import GenerationSettings
from fedcoder.evaluation.tasks import TASK_NAMES

__all__ = [
    "TASK_NAMES",
    "EvalError",
    "GenerationSettings",
    "evaluate",
    "pass_at_k",
    "score_completions",
]

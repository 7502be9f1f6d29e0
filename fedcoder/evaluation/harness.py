"""Running an evaluation: pick problems, get completions, score them in the sandbox, report.

What a run leaves in its output directory:

- `samples.jsonl`: one line per scored sample (task, problem_id, sample,
  completion, status, stderr excerpt), appended a few problems at a time.
  A rerun into the same directory skips the problems already there.
- `run.json`: what produced the samples (model or completions file, mode,
  decoding, time limits). A rerun that differs in any of these is refused
  rather than mixing two runs' samples.
- `results.json` and `results.md`: the scores over the selected problems.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedcoder.evaluation.completions import read_completions
from fedcoder.evaluation.data import data_source, load_problems
from fedcoder.evaluation.errors import EvalError
from fedcoder.evaluation.report import build_results, task_scores, write_results
from fedcoder.evaluation.settings import GenerationSettings
from fedcoder.evaluation.tasks import MODES, TASK_NAMES, TASKS, Mode, Problem, build_program
from fedcoder.sandbox import Limits, execute_many

log = logging.getLogger(__name__)

# Completions for a chunk of one task's problems: n samples per problem.
CompletionSource = Callable[[Sequence[Problem]], list[list[str]]]

COMPLETIONS_CHUNK = 64  # problems scored (and appended) together when nothing is generated


def evaluate(
    base: str,
    *,
    out_dir: str | Path,
    adapter: str | Path | None = None,
    tasks: Iterable[str] = TASK_NAMES,
    settings: GenerationSettings = GenerationSettings(),
    limit: int | None = None,
    data_dir: str | Path | None = None,
    limits: Limits = Limits(),
    workers: int | None = None,
    quantization: int = 0,
    dtype: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Generate completions with `base` (plus `adapter`), score them, write the reports.

    dtype is a torch dtype name ("bfloat16", "float32", ...); None picks
    bfloat16 on a GPU and float32 on a CPU. Returns the results.json content.
    """
    # Imported here so that scoring completions never loads torch.
    from fedcoder.evaluation.generation import Generator, default_dtype, load_model

    problems = _select(tasks, data_dir, limit)
    run = {
        "source": {
            "base": base,
            "adapter": str(adapter) if adapter is not None else None,
            "quantization": quantization,
            "dtype": dtype or default_dtype(),
        },
        "mode": settings.mode,
        # Batch size changes which random numbers each sample draws, not what a sample is;
        # CUDA graphs change neither.
        "generation": {
            k: v
            for k, v in asdict(settings).items()
            if k not in ("mode", "batch_size", "cuda_graphs")
        },
        "limits": asdict(limits),
    }
    out_dir = Path(out_dir)
    _check_same_run(out_dir, run)  # before the model loads, which may take minutes
    model, tokenizer = load_model(
        base, adapter, quantization=quantization, dtype=dtype, device=device
    )
    generator = Generator(model, tokenizer, settings)
    config = _config(
        run,
        problems,
        limit,
        data_dir,
        batch_size=settings.batch_size,
        max_length={t: settings.max_length or TASKS[t].max_length for t in problems},
    )
    chunk = max(1, 4 * settings.batch_size // settings.n_samples)
    _record_run(out_dir, run)
    return _run(generator, problems, out_dir, settings.mode, limits, workers, chunk, config)


def score_completions(
    completions: str | Path,
    *,
    out_dir: str | Path,
    tasks: Iterable[str] = TASK_NAMES,
    mode: Mode = "completion",
    limit: int | None = None,
    data_dir: str | Path | None = None,
    limits: Limits = Limits(),
    workers: int | None = None,
) -> dict[str, Any]:
    """Score pre-generated completions (see `completions.py` for the file format).

    Problems the file has no completion for are left out (with a warning);
    `limit` keeps the first N of those it has. Returns the results.json content.
    """
    if mode not in MODES:
        raise EvalError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
    path = Path(completions)
    if not path.is_file():  # before any dataset is fetched
        raise EvalError(f"completions file not found: {path}")
    every = _select(tasks, data_dir, None)
    samples = read_completions(path, {t: {p.problem_id for p in ps} for t, ps in every.items()})
    problems = {}
    for task, candidates in every.items():
        present = [p for p in candidates if (task, p.problem_id) in samples]
        if len(present) < len(candidates):
            log.warning(
                "%s: %d of %d problems have no completion in %s; they are left out",
                task,
                len(candidates) - len(present),
                len(candidates),
                path,
            )
        problems[task] = present[:limit]
    run = {
        "source": {"completions_sha256": hashlib.sha256(path.read_bytes()).hexdigest()},
        "mode": mode,
        "limits": asdict(limits),
    }
    out_dir = Path(out_dir)
    _check_same_run(out_dir, run)
    config = _config(run, problems, limit, data_dir)
    config["source"] = {**run["source"], "completions": str(path)}

    def lookup(chunk: Sequence[Problem]) -> list[list[str]]:
        return [samples[p.task, p.problem_id] for p in chunk]

    _record_run(out_dir, run)
    return _run(lookup, problems, out_dir, mode, limits, workers, COMPLETIONS_CHUNK, config)


def _select(
    tasks: Iterable[str], data_dir: str | Path | None, limit: int | None
) -> dict[str, list[Problem]]:
    tasks = list(dict.fromkeys(tasks))  # in order, once each
    if not tasks:
        raise EvalError("no tasks given")
    if limit is not None and limit < 1:
        raise EvalError("--limit must be at least 1")
    directory = Path(data_dir) if data_dir is not None else None
    return {task: list(load_problems(task, directory)[:limit]) for task in tasks}


def _check_same_run(out_dir: Path, run: Mapping[str, Any]) -> None:
    """Refuse to resume into an output directory that another kind of run wrote."""
    record = out_dir / "run.json"
    if not record.is_file():
        return
    previous = json.loads(record.read_text(encoding="utf-8"))
    run = json.loads(json.dumps(run))  # as it would read back: lists, not tuples
    changed = sorted(k for k in run.keys() | previous.keys() if run.get(k) != previous.get(k))
    if changed:
        raise EvalError(
            f"{out_dir} holds samples of another run ({', '.join(changed)} differ); "
            "choose another --out"
        )


def _record_run(out_dir: Path, run: Mapping[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / "run.json"
    if not record.is_file():
        record.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")


def _config(
    run: Mapping[str, Any],
    problems: Mapping[str, Sequence[Problem]],
    limit: int | None,
    data_dir: str | Path | None,
    **extra: Any,
) -> dict[str, Any]:
    """The `config` of results.json: the run, plus what was selected and from where."""
    directory = Path(data_dir) if data_dir is not None else None
    return {
        **run,
        **extra,
        "tasks": list(problems),
        "limit": limit,
        "data": {task: data_source(task, directory) for task in problems},
    }


def _run(
    source: CompletionSource,
    problems: Mapping[str, Sequence[Problem]],
    out_dir: Path,
    mode: Mode,
    limits: Limits,
    workers: int | None,
    chunk: int,
    config: Mapping[str, Any],
) -> dict[str, Any]:
    store = SampleStore(out_dir / "samples.jsonl")
    for task, task_problems in problems.items():
        pending = [p for p in task_problems if (task, p.problem_id) not in store]
        with tqdm(
            total=len(task_problems),
            initial=len(task_problems) - len(pending),
            desc=task,
            unit="problem",
        ) as bar:
            for records in scored_chunks(source, pending, mode, limits, workers, chunk):
                store.append(records)
                bar.update(len({r["problem_id"] for r in records}))
    scores = {
        task: task_scores([store[task, p.problem_id] for p in task_problems])
        for task, task_problems in problems.items()
    }
    results = build_results(scores, config)
    write_results(out_dir, results)
    return results


def scored_chunks(
    source: CompletionSource,
    problems: Sequence[Problem],
    mode: Mode,
    limits: Limits,
    workers: int | None,
    chunk: int,
) -> Iterable[list[dict[str, Any]]]:
    """Sample records, a chunk of problems at a time.

    A chunk's programs run in the sandbox while the next chunk is generated,
    so the accelerator does not wait for the compilers.
    """
    with ThreadPoolExecutor(max_workers=1) as scorer:
        scoring: Future | None = None
        for start in range(0, len(problems), chunk):
            part = problems[start : start + chunk]
            completions = source(part)
            if scoring is not None:
                yield scoring.result()
            scoring = scorer.submit(_score, part, completions, mode, limits, workers)
        if scoring is not None:
            yield scoring.result()


def _score(
    problems: Sequence[Problem],
    completions: Sequence[Sequence[str]],
    mode: Mode,
    limits: Limits,
    workers: int | None,
) -> list[dict[str, Any]]:
    samples = [
        (problem, index, completion)
        for problem, texts in zip(problems, completions, strict=True)
        for index, completion in enumerate(texts)
    ]
    programs = [build_program(problem, completion, mode) for problem, _, completion in samples]
    outcomes = execute_many(programs, limits, workers=workers)
    return [
        {
            "task": problem.task,
            "problem_id": problem.problem_id,
            "sample": index,
            "completion": completion,
            "status": outcome.status,
            "stderr": outcome.stderr,  # the sandbox keeps only the last ~1000 characters
            "duration_s": round(outcome.duration_s, 3),
        }
        for (problem, index, completion), outcome in zip(samples, outcomes, strict=True)
    ]


class SampleStore:
    """samples.jsonl, read once and then appended to, with records by (task, problem_id)."""

    def __init__(self, path: Path):
        self.path = path
        self._records: dict[tuple[str, str], list[dict[str, Any]]] = {}
        if path.is_file():
            self._load()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._records

    def __getitem__(self, key: tuple[str, str]) -> list[dict[str, Any]]:
        return self._records.get(key, [])

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(lines)
        for record in records:
            self._add(record)

    def _add(self, record: dict[str, Any]) -> None:
        self._records.setdefault((record["task"], record["problem_id"]), []).append(record)

    def _load(self) -> None:
        data = self.path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) < len(data):
            # A run killed mid-write leaves half a line; appending after it
            # would corrupt the next record too.
            log.warning("%s: dropping a partly written last line", self.path)
            with self.path.open("r+b") as file:
                file.truncate(len(whole))
        for number, line in enumerate(whole.decode("utf-8").splitlines(), start=1):
            try:
                self._add(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise EvalError(
                    f"{self.path} line {number} is not a sample record; choose another --out"
                ) from err

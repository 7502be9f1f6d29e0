"""The tables of docs/results.md from a WORK_DIR that bench/smollm2_study.sh filled.

    python bench/smollm2_study_table.py WORK_DIR

Prints markdown: pass@1 per model, mode and task with standard errors; paired
differences between models on the same problems with bootstrap 95 % intervals
(problems resampled; a difference whose interval excludes 0 is outside the noise);
held-out loss with its paired comparison; and each step's wall time. Rows of the
eval's samples.jsonl are re-read here, so scores can be rescored elsewhere first.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedcoder.evaluation.tasks import TASK_NAMES
from fedcoder.resampling import interval, resampled_means

MODELS = ("base", "federated", "central")
MODES = ("completion", "chat")
PAIRS = (("federated", "base"), ("central", "base"), ("federated", "central"))


def per_problem(eval_dir: Path) -> dict[str, dict[str, float]]:
    """Each task's problems and their pass@1 (fraction of samples passed)."""
    samples: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    with (eval_dir / "samples.jsonl").open(encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            samples[row["task"]][row["problem_id"]].append(row["status"] == "passed")
    return {t: {p: float(np.mean(v)) for p, v in ps.items()} for t, ps in samples.items()}


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"  # None: a standard error of one problem


def score_table(scores: dict[tuple[str, str], dict]) -> list[str]:
    lines = [
        "| model | mode | " + " | ".join(TASK_NAMES) + " | average |",
        "|---|---|" + "---:|" * (len(TASK_NAMES) + 1),
    ]
    for mode in MODES:
        for model in MODELS:
            results = scores.get((model, mode))
            if results is None:
                continue
            # A run cut off part-way has fewer tasks: their cells and the average stay empty.
            cells = [
                f"{pct(results[t]['pass@1'])} ± {pct(results[t]['pass@1_stderr'])}"
                if t in results
                else ""
                for t in TASK_NAMES
            ]
            complete = all(t in results for t in TASK_NAMES)
            average = (
                f"{pct(results['average'])} ± {pct(results['average_stderr'])}" if complete else ""
            )
            lines.append(f"| {model} | {mode} | " + " | ".join(cells) + f" | {average} |")
    return lines


def paired_table(problems: dict[tuple[str, str], dict]) -> list[str]:
    lines = [
        "| difference (points) | mode | " + " | ".join(TASK_NAMES) + " | average |",
        "|---|---|" + "---:|" * (len(TASK_NAMES) + 1),
    ]
    for mode in MODES:
        for a, b in PAIRS:
            if (a, mode) not in problems or (b, mode) not in problems:
                continue
            cells, draws = [], []
            for seed, task in enumerate(TASK_NAMES):
                left, right = problems[a, mode].get(task), problems[b, mode].get(task)
                if not left or not right or left.keys() != right.keys():
                    cells.append("")
                    continue
                diff = [left[p] - right[p] for p in sorted(left)]
                task_draws = resampled_means(diff, seed=seed)  # each task its own resamples
                draws.append(task_draws)
                cells.append(_with_interval(float(np.mean(diff)), task_draws))
            if len(draws) == len(TASK_NAMES):
                mean = float(np.mean([np.mean(d) for d in draws]))
                cells.append(_with_interval(mean, np.mean(draws, axis=0)))
            else:
                cells.append("")
            lines.append(f"| {a} − {b} | {mode} | " + " | ".join(cells) + " |")
    return lines


def _with_interval(value: float, draws: np.ndarray) -> str:
    low, high = interval(draws)
    mark = "**" if low > 0 or high < 0 else ""  # outside the noise: the interval excludes 0
    return f"{mark}{100 * value:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]{mark}"


def loss_table(losses: dict[str, dict]) -> list[str]:
    lines = ["| model | held-out loss ± s.e. | vs base [95% CI] |", "|---|---:|---:|"]
    counts = np.asarray(losses["base"]["per_example"]["tokens"])
    kept = counts > 0
    draws = {}
    for model, result in losses.items():
        sums = np.asarray(result["per_example"]["loss_sum"])
        # Same rows, same seed: every model sees the same resamples, so differences pair up.
        draws[model] = resampled_means(sums[kept] / counts[kept], counts[kept], seed=0)
    for model in MODELS:
        if model not in losses:
            continue
        result = losses[model]
        delta = result["loss"] - losses["base"]["loss"]
        low, high = interval(draws[model] - draws["base"])
        vs = "" if model == "base" else f"{delta:+.4f} [{low:+.4f}, {high:+.4f}]"
        lines.append(f"| {model} | {result['loss']:.4f} ± {result['stderr']:.4f} | {vs} |")
    if {"federated", "central"} <= losses.keys():
        gain = {m: losses["base"]["loss"] - losses[m]["loss"] for m in ("federated", "central")}
        ratio = gain["federated"] / gain["central"]
        ratio_draws = (draws["base"] - draws["federated"]) / (draws["base"] - draws["central"])
        low, high = interval(ratio_draws)
        gap = losses["federated"]["loss"] - losses["central"]["loss"]
        gap_low, gap_high = interval(draws["federated"] - draws["central"])
        lines += [
            "",
            f"Federated improvement / centralized improvement: {100 * ratio:.1f} % "
            f"[95% CI {100 * low:.1f}, {100 * high:.1f}] over "
            f"{int(kept.sum())} held-out rows, {int(counts.sum())} response tokens. "
            f"Federated − centralized: {gap:+.4f} [{gap_low:+.4f}, {gap_high:+.4f}].",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    args = parser.parse_args()
    scores, problems = {}, {}
    for model in MODELS:
        for mode in MODES:
            directory = args.work / "eval" / f"{model}-{mode}"
            if (directory / "results.json").is_file():
                scores[model, mode] = json.loads((directory / "results.json").read_text())
                problems[model, mode] = per_problem(directory)
    losses = {
        path.stem: json.loads(path.read_text())
        for path in sorted((args.work / "loss").glob("*.json"))
    }
    print("\n".join(["## pass@1 (%)", "", *score_table(scores), ""]))
    print("\n".join(["## Paired differences", "", *paired_table(problems), ""]))
    if "base" in losses:
        print("\n".join(["## Held-out loss", "", *loss_table(losses), ""]))
    times = args.work / "times.tsv"
    if times.is_file():
        rows = [line.split("\t") for line in times.read_text().splitlines()]
        print("## Wall times\n\n| step | exit | seconds |\n|---|---:|---:|")
        print("\n".join(f"| {n} | {rc} | {s} |" for n, rc, s in rows))


if __name__ == "__main__":
    main()

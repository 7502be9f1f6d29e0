"""The four benchmarks: prompts, stop strings, and how a program to run is assembled.

Two prompting modes, chosen per run:

- "completion" (the default) matches the FlowerTune code leaderboard: the model
  continues the raw prompt, the continuation is cut at the first stop string,
  and the program is prompt + continuation + tests.
- "chat" suits instruct models: the prompt is wrapped in a request sent through
  the tokenizer's chat template, and the code is taken from the reply's fenced
  block.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fedcoder.sandbox import Program

Language = Literal["python", "javascript", "cpp"]
Mode = Literal["completion", "chat"]
MODES: tuple[Mode, ...] = ("completion", "chat")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    language: Language
    max_length: int  # prompt + generated tokens
    strip_prompt: bool  # the model sees prompt.strip(): a trailing newline hurts some tokenizers
    stop: tuple[str, ...]  # MultiPL-E problems add the dataset's own stop tokens


_MBPP_STOP = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")

# `<file_sep>` ends a file in StarCoder-style tokenizers; the leaderboard stops on
# it for HumanEval and MultiPL-E (not MBPP), and so does this harness.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "humaneval",
            "python",
            1024,
            True,
            ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"),
        ),
        # 2048 because a few MBPP prompts alone come close to 1024 tokens.
        TaskSpec("mbpp", "python", 2048, False, _MBPP_STOP),
        # MBPP's validation split, scored exactly as MBPP: for choosing rounds in training.
        TaskSpec("mbpp-validation", "python", 2048, False, _MBPP_STOP),
        TaskSpec("multiple-cpp", "cpp", 1024, True, ("<file_sep>",)),
        TaskSpec("multiple-js", "javascript", 1024, True, ("<file_sep>",)),
    )
}
# The leaderboard's four, run by default; mbpp-validation only when asked for.
TASK_NAMES: tuple[str, ...] = ("humaneval", "mbpp", "multiple-cpp", "multiple-js")

_LANGUAGE_NAMES = {"python": "Python", "javascript": "JavaScript", "cpp": "C++"}
# Fence tags a reply may use per language; the first is the one requests use.
_FENCE_TAGS = {
    "python": ("python", "py", "python3"),
    "javascript": ("javascript", "js", "node"),
    "cpp": ("cpp", "c++", "cc", "cxx"),
}


@dataclass(frozen=True)
class Problem:
    task: str
    problem_id: str  # the dataset's own id: HumanEval task_id, MBPP task_id, MultiPL-E name
    prompt: str  # verbatim from the dataset (MBPP: built from the task text and first test)
    tests: str  # appended to the solution; the program passes iff it exits cleanly
    entry_point: str  # the function the tests call ("" for MBPP, whose tests vary)
    stop: tuple[str, ...]  # where a completion-mode continuation is cut
    request: str  # the user message in chat mode

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]


def humaneval_problem(row: Mapping[str, Any]) -> Problem:
    prompt, entry_point = row["prompt"], row["entry_point"]
    return Problem(
        task="humaneval",
        problem_id=row["task_id"],
        prompt=prompt,
        tests=f"\n{row['test']}\ncheck({entry_point})\n",
        entry_point=entry_point,
        stop=TASKS["humaneval"].stop,
        request=_complete_request("python", prompt),
    )


def mbpp_problem(row: Mapping[str, Any], task: str = "mbpp") -> Problem:
    # Only the three public asserts count: no setup code and no challenge tests.
    text, first_test = row["text"], row["test_list"][0]
    return Problem(
        task=task,
        problem_id=str(row["task_id"]),
        prompt=f'"""\n{text}\n{first_test}\n"""\n',
        tests="\n".join(row["test_list"]) + "\n",
        entry_point="",
        stop=TASKS[task].stop,
        request=(
            f"{text}\nYour code should pass this test:\n\n```python\n{first_test}\n```\n\n"
            "Answer with the Python code in one ```python code block."
        ),
    )


def multiple_problem(row: Mapping[str, Any], task: str) -> Problem:
    spec = TASKS[task]
    return Problem(
        task=task,
        problem_id=row["name"],
        prompt=row["prompt"],
        tests=row["tests"],
        entry_point=_tested_function(row["tests"]),
        stop=tuple(row["stop_tokens"]) + spec.stop,
        request=_complete_request(spec.language, row["prompt"]),
    )


def _complete_request(language: Language, prompt: str) -> str:
    tag = _FENCE_TAGS[language][0]
    return (
        f"Complete the following {_LANGUAGE_NAMES[language]} function. Answer with the whole "
        f"function in one ```{tag} code block.\n\n```{tag}\n{prompt.strip()}\n```"
    )


def _tested_function(tests: str) -> str:
    # MultiPL-E tests bind the function under test to `candidate`.
    match = re.search(r"candidate\s*=\s*(\w+)\s*;", tests)
    return match.group(1) if match else ""


def completion_prompt(problem: Problem) -> str:
    """The text a base model continues in completion mode."""
    return problem.prompt.strip() if problem.spec.strip_prompt else problem.prompt


def truncate_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """Cut `text` at the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def build_program(problem: Problem, completion: str, mode: Mode) -> Program:
    """The program whose clean exit means `completion` solves `problem`."""
    if mode == "chat":
        solution, tests = _chat_solution(problem, extract_code(completion, problem.spec.language))
    else:
        solution, tests = continue_prompt(problem, completion), problem.tests
    return Program(language=problem.spec.language, source=f"{solution}\n{tests}")


def continue_prompt(problem: Problem, completion: str) -> str:
    """The prompt followed by a completion-mode continuation.

    The model saw the stripped prompt, so its continuation opens a new line and
    is appended to that. Anything else (canonical solutions, samples written
    for the dataset's own prompt) continues the prompt verbatim. Both joins
    give the same program up to whitespace, which no language here minds.
    """
    if completion.startswith("\n"):
        return completion_prompt(problem) + completion
    return problem.prompt + completion


def extract_code(reply: str, language: Language) -> str:
    """The code in a chat reply: its first fenced block tagged with `language`,
    else its first fenced block (an unterminated one runs to the end), else all of it."""
    blocks = re.findall(r"```[ \t]*([\w+#-]*)[^\n]*\n(.*?)(?:```|\Z)", reply, flags=re.DOTALL)
    if not blocks:
        return reply
    tagged = [code for tag, code in blocks if tag.lower() in _FENCE_TAGS[language]]
    return (tagged or [blocks[0][1]])[0]


_DEFINITION = {
    "javascript": r"\bfunction\s+{name}\s*\(|\b(?:const|let|var)\s+{name}\s*=",
    "cpp": r"\b{name}\s*\([^;{{}}]*\)\s*(?:const\s*)?\{{",
}


def _chat_solution(problem: Problem, code: str) -> tuple[str, str]:
    """(solution, tests) for the code of a chat reply.

    A reply that defines the entry point is used whole; one that does not is
    taken as the function's body and appended to the prompt. Python needs no
    such test: the prompt's stub (a docstring-only function) is valid code,
    which a definition in the reply replaces and a bare body completes, and
    keeping the prompt keeps its imports and helper functions.
    """
    language = problem.spec.language
    if language == "python" or not _defines(code, language, problem.entry_point):
        return problem.prompt.rstrip() + "\n" + code, problem.tests
    if language == "cpp":
        # MultiPL-E's C++ tests open by closing the prompt's function and then
        # define main(), so the reply's own main() goes and that brace is dropped.
        includes = "".join(line for line in problem.prompt.splitlines(True) if line.startswith("#"))
        own_main = re.search(r"\bint\s+main\s*\(", code)
        code = code[: own_main.start()] if own_main else code
        return includes + code, problem.tests.removeprefix("}")
    return code, problem.tests


def _defines(code: str, language: Language, name: str) -> bool:
    pattern = _DEFINITION[language].format(name=re.escape(name))
    return bool(name) and re.search(pattern, code) is not None

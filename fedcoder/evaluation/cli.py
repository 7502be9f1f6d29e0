"""`fedcoder eval`: score a model, or a file of completions, on the four code benchmarks."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcoder.evaluation.errors import EvalError
from fedcoder.evaluation.settings import GenerationSettings
from fedcoder.evaluation.tasks import MODES, TASK_NAMES, TASKS

_DESCRIPTION = """\
Score code generation on HumanEval, MBPP, MultiPL-E C++ and MultiPL-E JavaScript,
by default with the FlowerTune code leaderboard's settings (raw completion prompts,
T=0.2 / top-p 0.95 sampling with seed 0, one sample per problem, pass@1).

Give a model (--base, optionally --adapter) to generate completions, or
--completions FILE to score completions made elsewhere (JSONL, one object per
sample: {"task": "humaneval", "problem_id": "HumanEval/0", "completion": "..."}).

OUT gets samples.jsonl (every sample, its status and stderr), results.json and
results.md. Rerunning into the same OUT resumes: problems already scored are skipped.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `eval` on the `fedcoder` command's subparsers."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model or completions on HumanEval, MBPP, MultiPL-E C++/JS",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--base",
        metavar="MODEL",
        help="base model: Hub id, local directory, .gguf file, or builtin:smollm2-135m-instruct",
    )
    source.add_argument(
        "--completions", metavar="FILE", help="score this JSONL of completions; no model is loaded"
    )
    parser.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory for --base")
    parser.add_argument(
        "--tasks",
        default=",".join(TASK_NAMES),
        help=f"comma-separated, from {','.join(TASKS)} (default: {','.join(TASK_NAMES)}; "
        "mbpp-validation is MBPP's validation split, task_id 511-600)",
    )
    parser.add_argument("--limit", type=int, metavar="N", help="first N problems of each task")
    parser.add_argument(
        "--out",
        default="results/eval",
        metavar="DIR",
        help="output directory (default: results/eval)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="read MBPP and MultiPL-E from mbpp.jsonl, multipl-e_humaneval-cpp.jsonl and "
        "multipl-e_humaneval-js.jsonl in DIR, not from the Hub",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="completion",
        help="completion: raw prompts, as the leaderboard (default); chat: the "
        "tokenizer's chat template, code taken from the reply",
    )

    generation = parser.add_argument_group("generation (with --base)")
    generation.add_argument(
        "--n-samples",
        type=int,
        default=1,
        metavar="N",
        help="samples per problem; pass@k is reported for k <= N (default 1)",
    )
    generation.add_argument("--greedy", action="store_true", help="greedy decoding, not sampling")
    generation.add_argument("--temperature", type=float, default=0.2, help="(default 0.2)")
    generation.add_argument("--top-p", type=float, default=0.95, help="(default 0.95)")
    generation.add_argument("--seed", type=int, default=0, help="(default 0)")
    generation.add_argument(
        "--max-length",
        type=int,
        metavar="TOKENS",
        help="prompt + generated tokens (default: 1024, MBPP 2048)",
    )
    generation.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="TOKENS",
        help="also cap the generated tokens (default: no cap beyond --max-length)",
    )
    generation.add_argument(
        "--batch-size", type=int, default=8, help="sequences generated together (default 8)"
    )
    generation.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="launch each decoding step's kernels from Python rather than replaying a "
        "captured CUDA graph (slower; the same tokens)",
    )
    generation.add_argument(
        "--quantization",
        type=int,
        choices=(0, 4, 8),
        default=0,
        help="load the base 4- or 8-bit (bitsandbytes); the adapter then "
        "stays unmerged (default 0: no)",
    )
    generation.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="auto: bfloat16 on a GPU, float32 on a CPU",
    )
    generation.add_argument("--device", help="torch device (default: cuda if available, else cpu)")

    execution = parser.add_argument_group("execution")
    execution.add_argument(
        "--timeout-python",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds per Python program (default 3)",
    )
    execution.add_argument(
        "--timeout-node",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds per JavaScript program (default 5)",
    )
    execution.add_argument(
        "--timeout-cpp",
        type=float,
        default=15.0,
        metavar="S",
        help="seconds for g++ and again for the binary (default 15)",
    )
    execution.add_argument(
        "--workers", type=int, help="programs run in parallel (default: the sandbox's choice)"
    )
    parser.set_defaults(func=run_from_args)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run `fedcoder eval`; bad input raises EvalError, which `fedcoder` prints as one line."""
    from fedcoder.evaluation.harness import evaluate, score_completions
    from fedcoder.sandbox import Limits

    limits = Limits(
        python_timeout_s=args.timeout_python,
        node_timeout_s=args.timeout_node,
        cpp_compile_timeout_s=args.timeout_cpp,
        cpp_run_timeout_s=args.timeout_cpp,
    )
    common = {
        "out_dir": args.out,
        "tasks": _task_list(args.tasks),
        "limit": args.limit,
        "data_dir": args.data_dir,
        "limits": limits,
        "workers": args.workers,
    }
    if args.completions is None:
        results = evaluate(
            args.base,
            adapter=args.adapter,
            settings=_settings(args),
            quantization=args.quantization,
            dtype=None if args.dtype == "auto" else args.dtype,
            device=args.device,
            **common,
        )
    elif args.adapter is not None:
        raise EvalError("--adapter goes with --base, not with --completions")
    else:
        results = score_completions(args.completions, mode=args.mode, **common)
    print(_summary(results))
    print(f"details: {Path(args.out) / 'results.md'}, samples: {Path(args.out) / 'samples.jsonl'}")
    return 0


def _settings(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings(
        mode=args.mode,
        n_samples=args.n_samples,
        greedy=args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        cuda_graphs=not args.no_cuda_graphs,
    )


def _task_list(value: str) -> list[str]:
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS] or ([] if tasks else [value])
    if unknown:
        raise EvalError(f"unknown task '{unknown[0]}' (choose from {','.join(TASKS)})")
    return tasks


def _summary(results: dict) -> str:
    """A few lines for the terminal: pass@1 per task and the average."""
    lines = []
    for task in results["config"]["tasks"]:
        scores = results[task]
        lines.append(
            f"{task:<13} pass@1 {100 * scores['pass@1']:6.2f}%  ({scores['n_problems']} problems)"
        )
    lines.append(f"{'average':<13} pass@1 {100 * results['average']:6.2f}%")
    return "\n".join(lines)

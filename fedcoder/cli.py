"""The `fedcoder` command: `fedcoder run` (a federated run) and `fedcoder eval`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedcoder import __version__


def _run(args: argparse.Namespace) -> int:
    from fedcoder.simulation import run_simulation

    overrides = list(args.config or []) + list(args.run_config or [])
    return run_simulation(
        Path(args.app),
        num_supernodes=args.num_supernodes,
        client_cpus=args.client_cpus,
        client_gpus=args.client_gpus,
        run_config=overrides,
        flwr_home=Path(args.flwr_home) if args.flwr_home else None,
    )


def _add_run_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a federated fine-tuning simulation (Flower Simulation Engine)",
        description=(
            "Start a private local SuperLink, run the fedcoder app with `flwr run --stream`, "
            "then stop every process it started. Results go to results/<run>/ "
            "(checkpoints peft_<round>, metrics.json, train_loss.png, config.json)."
        ),
    )
    parser.add_argument("--app", default=".", help="Flower app directory (default: .)")
    parser.add_argument(
        "--config", action="append", metavar="TOML",
        help="a TOML file of run-config overrides, e.g. examples/quickstart-cpu.toml",
    )  # fmt: skip
    parser.add_argument(
        "--run-config", action="append", metavar="'KEY=VALUE ...'",
        help="run-config overrides, as for `flwr run --run-config` (repeatable)",
    )  # fmt: skip
    parser.add_argument("--num-supernodes", type=int, default=10, help="virtual clients (10)")
    parser.add_argument("--client-cpus", type=int, default=1, help="CPUs per client (1)")
    parser.add_argument("--client-gpus", type=float, default=0.0, help="GPUs per client (0)")
    parser.add_argument("--flwr-home", help="FLWR_HOME to use (default: a new temp dir)")
    parser.set_defaults(func=_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcoder", description="Federated fine-tuning of code LLMs on Flower."
    )
    parser.add_argument("--version", action="version", version=f"fedcoder {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(subparsers)
    from fedcoder.evaluation.cli import add_parser as add_eval_parser

    add_eval_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The `fedcoder` command: `fedcoder run` (a federated run), `fedcoder eval` and `fedcoder loss`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from fedcoder import __version__

# Errors that mean "this input is unusable": shown as one line, never as a traceback.
# Looked up in sys.modules rather than imported, since importing fedcoder.model loads
# torch, and an error can only be raised by a module already loaded.
_USER_ERRORS = (
    ("fedcoder.config", "ConfigError"),
    ("fedcoder.sources", "DataError"),
    ("fedcoder.architecture", "ModelError"),
    ("fedcoder.evaluation.errors", "EvalError"),
)


def _user_error_types() -> tuple[type[Exception], ...]:
    return tuple(
        getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules
    )


def _run(args: argparse.Namespace) -> int:
    from fedcoder.preflight import flwr_run_config, preflight
    from fedcoder.simulation import run_simulation

    # Every input is checked before the SuperLink starts, so a bad one costs
    # seconds and one line instead of a Flower traceback from inside the run.
    checked = preflight(
        Path(args.app),
        config_files=args.config or [],
        run_config=args.run_config or [],
        num_supernodes=args.num_supernodes,
    )
    with flwr_run_config(checked.overrides) as run_config:
        return run_simulation(
            Path(args.app),
            num_supernodes=args.num_supernodes,
            client_cpus=args.client_cpus,
            client_gpus=args.client_gpus,
            run_config=run_config,
            flwr_home=Path(args.flwr_home) if args.flwr_home else None,
        )


def _add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """The app and its run-config overrides: the same for `fedcoder run` and `deploy`."""
    parser.add_argument("--app", default=".", help="Flower app directory (default: .)")
    parser.add_argument(
        "--config", action="append", metavar="TOML",
        help="a TOML file of run-config overrides, e.g. examples/quickstart-cpu.toml",
    )  # fmt: skip
    parser.add_argument(
        "--run-config", action="append", metavar="'KEY=VALUE ...'",
        help="run-config overrides, as for `flwr run --run-config` (repeatable)",
    )  # fmt: skip


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
    _add_app_arguments(parser)
    parser.add_argument("--num-supernodes", type=int, default=10, help="virtual clients (10)")
    parser.add_argument("--client-cpus", type=int, default=1, help="CPUs per client (1)")
    parser.add_argument(
        "--client-gpus", type=float, default=None,
        help="GPUs per client (default: 1 where CUDA GPUs are visible, else 0). 1 gives each "
        "client its own GPU, so a host with N GPUs trains N sampled clients at once; a "
        "fraction shares a GPU on purpose",
    )  # fmt: skip
    parser.add_argument("--flwr-home", help="FLWR_HOME to use (default: a new temp dir)")
    parser.set_defaults(func=_run)


def _loss(args: argparse.Namespace) -> int:
    import json

    from fedcoder.heldout import heldout_loss

    result = heldout_loss(
        args.base,
        args.adapter,
        dataset=args.dataset,
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
        seq_length=args.seq_length,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
    )
    print(
        f"held-out loss {result['loss']:.4f} ± {result['stderr']:.4f} "
        f"({result['examples']} rows, {result['tokens']} response tokens)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


def _add_loss_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "loss",
        help="held-out loss of a base model plus an adapter",
        description=(
            "Mean cross-entropy per response token on the rows a run with "
            "dataset.holdout-fraction kept out of training, tokenized as in training, "
            "with a bootstrap standard error over rows."
        ),
    )
    parser.add_argument("--base", required=True, metavar="MODEL", help="base model, as model.name")
    parser.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory (merged in)")
    parser.add_argument(
        "--dataset", required=True, help="the run's static.dataset.name (a file, directory or id)"
    )
    parser.add_argument(
        "--holdout-fraction", type=float, required=True, help="the run's dataset.holdout-fraction"
    )
    parser.add_argument("--seed", type=int, default=42, help="the run's train.seed (42)")
    parser.add_argument("--seq-length", type=int, default=512, help="the run's train.seq-length")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (8)")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="(float32)"
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", metavar="FILE", help="also write the result, per-row sums too")
    parser.set_defaults(func=_loss)


def _deploy(args: argparse.Namespace) -> int:
    from fedcoder.config import ConfigError
    from fedcoder.deployment import run_local_deployment
    from fedcoder.preflight import flwr_run_config, preflight

    node_configs = args.node_config or []
    num_supernodes = args.supernodes or len(node_configs) or 2
    if node_configs and len(node_configs) != num_supernodes:
        raise ConfigError(
            f"--supernodes {num_supernodes} needs one --node-config per SuperNode, "
            f"got {len(node_configs)}"
        )
    checked = preflight(
        Path(args.app),
        config_files=args.config or [],
        run_config=args.run_config or [],
        num_supernodes=num_supernodes,
    )
    with flwr_run_config(checked.overrides) as run_config:
        return run_local_deployment(
            Path(args.app),
            num_supernodes=num_supernodes,
            node_configs=node_configs,
            run_config=run_config,
            insecure=args.insecure,
            resident=args.isolation == "process",
            workdir=Path(args.workdir) if args.workdir else None,
        )


def _add_deploy_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy",
        help="run the app on a local Flower deployment (SuperLink + SuperNodes, TLS, node auth)",
        description=(
            "Start a SuperLink and N SuperNodes on loopback with TLS and SuperNode "
            "authentication (fresh test certificates and keys; only the registered "
            "SuperNodes may connect), run the fedcoder app with `flwr run --stream`, then "
            "stop every process it started. Each SuperNode keeps its base model loaded "
            "across rounds (--isolation process). See docs/deployment.md for several machines."
        ),
    )
    _add_app_arguments(parser)
    parser.add_argument(
        "--supernodes", type=int, metavar="N",
        help="SuperNodes to start (default: one per --node-config, else 2)",
    )  # fmt: skip
    parser.add_argument(
        "--node-config", action="append", metavar="'KEY=VALUE ...'",
        help="node config of the next SuperNode, e.g. \"dataset-path='/data/mine.jsonl'\" "
        "(repeatable; default: partition-id=i num-partitions=N of the run's dataset)",
    )  # fmt: skip
    parser.add_argument(
        "--isolation", choices=("process", "subprocess"), default="process",
        help="process (default): one resident ClientApp worker per SuperNode, the model stays "
        "loaded; subprocess: Flower's default, a new ClientApp process per message",
    )  # fmt: skip
    parser.add_argument(
        "--insecure", action="store_true",
        help="no TLS and no SuperNode authentication (debugging only)",
    )  # fmt: skip
    parser.add_argument(
        "--workdir", help="where credentials, logs and Flower state go (default: a new temp dir)"
    )
    parser.set_defaults(func=_deploy)


def _certs(args: argparse.Namespace) -> int:
    from fedcoder.certs import write_node_keys, write_tls_files

    out = Path(args.out)
    if args.role == "superlink":
        files = write_tls_files(out, args.host, days=args.days)
        print(
            f"SuperLink: --ssl-certfile {files.server_certificate} --ssl-keyfile "
            f"{files.server_key} --ssl-ca-certfile {files.ca_certificate}"
        )
        print(f"SuperNodes (--root-certificates) and the CLI: {files.ca_certificate}")
    else:
        keys = write_node_keys(out, args.name)
        print(f"SuperNode: --auth-supernode-private-key {keys.private_key} (keep it here)")
        print(f"SuperLink operator: flwr supernode register {keys.public_key}")
    return 0


def _add_certs_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "certs",
        help="make TLS certificates and SuperNode keys for testing a deployment",
        description=(
            "superlink: a new CA (ca.crt) and the SuperLink's certificate and key, valid for "
            "the given hosts plus 127.0.0.1 and localhost. supernode: one SuperNode's "
            "authentication key pair (ECDSA P-384, OpenSSH format). For testing and pilots; "
            "production certificates come from your own CA."
        ),
    )
    roles = parser.add_subparsers(dest="role", required=True)
    superlink = roles.add_parser("superlink", help="CA plus SuperLink TLS certificate and key")
    superlink.add_argument("--out", required=True, help="directory to write into")
    superlink.add_argument(
        "--host", action="append", default=[], metavar="NAME_OR_IP",
        help="an address SuperNodes and the CLI use to reach the SuperLink (repeatable)",
    )  # fmt: skip
    superlink.add_argument("--days", type=int, default=365, help="validity in days (365)")
    supernode = roles.add_parser("supernode", help="one SuperNode's authentication key pair")
    supernode.add_argument("--out", required=True, help="directory to write into")
    supernode.add_argument("--name", required=True, help="file name: NAME and NAME.pub")
    parser.set_defaults(func=_certs)


def _clientapp_worker(args: argparse.Namespace) -> int:
    from fedcoder.clientapp_worker import serve

    serve(
        args.runtime_api_address,
        insecure=args.insecure,
        root_certificates=Path(args.root_certificates) if args.root_certificates else None,
        parent_pid=args.parent_pid,
    )
    return 0


def _add_clientapp_worker_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "clientapp-worker",
        help="resident ClientApp process for a SuperNode started with --isolation process",
        description=(
            "Run a SuperNode's ClientApp tasks one after another in this one process, so the "
            "base model stays loaded across rounds (flwr-clientapp handles one message and "
            "exits). Start one per SuperNode, on the same machine, after "
            "`flower-supernode --isolation process`."
        ),
    )
    parser.add_argument(
        "--runtime-api-address", default="127.0.0.1:9094",
        help="the SuperNode's Runtime API, its --port (default: 127.0.0.1:9094)",
    )  # fmt: skip
    security = parser.add_mutually_exclusive_group()
    security.add_argument(
        "--insecure", action="store_true",
        help="plain HTTP to the Runtime API (it listens on loopback by default)",
    )  # fmt: skip
    security.add_argument(
        "--root-certificates", metavar="PEM",
        help="CA for a Runtime API served with TLS (flower-supernode --ssl-certfile)",
    )  # fmt: skip
    parser.add_argument(
        "--parent-pid", type=int, help="exit when this process (the SuperNode) exits"
    )
    parser.set_defaults(func=_clientapp_worker)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcoder", description="Federated fine-tuning of code LLMs on Flower."
    )
    parser.add_argument("--version", action="version", version=f"fedcoder {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(subparsers)
    _add_loss_parser(subparsers)
    _add_deploy_parser(subparsers)
    _add_certs_parser(subparsers)
    _add_clientapp_worker_parser(subparsers)
    from fedcoder.evaluation.cli import add_parser as add_eval_parser

    add_eval_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; an unusable input prints `fedcoder: error: <why>` and returns 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    # SIGTERM (a job scheduler, `kill`) ends Python without running `finally`
    # blocks; as an exception it lets the launchers stop every Flower process
    # they started.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        return args.func(args)
    except Exception as err:
        if not isinstance(err, _user_error_types()):
            raise
        print(f"fedcoder: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

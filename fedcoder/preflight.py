"""What `fedcoder run` (and `fedcoder deploy`) check before starting any process.

The ServerApp validates the same inputs, but only once the SuperLink and the
simulation (or SuperNodes) are up, and a failure there reaches the user as a
Flower traceback. The preflight builds the run config exactly as Flower will (the
app's `[tool.flwr.app.config]` defaults overridden by each `--config` file and
`--run-config` string, every one parsed by Flower's own `parse_config_args`),
then checks the federation size, the run directory, the dataset, the model and
(when asked for) the validation problems, so a bad input costs seconds and one
line naming it.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import tomli_w
from flwr.app.user_config import UserConfigValue
from flwr.common.config import flatten_dict, get_project_config, parse_config_args

from fedcoder.config import ConfigError, RunConfig

Overrides = dict[str, UserConfigValue]


@dataclass(frozen=True)
class CheckedRun:
    """A run that passed the preflight: its config, and the overrides to hand to Flower."""

    config: RunConfig
    overrides: Overrides


def preflight(
    app_dir: Path,
    *,
    config_files: Sequence[str] = (),
    run_config: Sequence[str] = (),
    num_supernodes: int = 10,
) -> CheckedRun:
    """Build and check the run's config; raise ConfigError, DataError, ModelError or EvalError.

    Later overrides win: the `config_files` in order, then the `run_config` strings in order.
    """
    overrides: Overrides = {}
    for path in config_files:
        overrides.update(_read_config_file(path))
    for text in run_config:
        overrides.update(_read_run_config(text))
    # Flower fuses the flat defaults with the overrides key by key; from_flat
    # then names any key the app does not declare, which Flower's fuse would
    # reject with a traceback.
    config = RunConfig.from_flat({**app_defaults(app_dir), **overrides})
    _check_federation(config, num_supernodes)
    from fedcoder.results import check_run_directory

    check_run_directory(config)
    _check_dataset(config, num_supernodes)
    _check_model(config)
    _check_validation_data(config)
    return CheckedRun(config, overrides)


def app_defaults(app_dir: Path) -> Overrides:
    """The app's `[tool.flwr.app.config]`, flattened as Flower flattens it."""
    try:
        project = get_project_config(app_dir)
    except (OSError, ValueError) as err:  # a missing or invalid pyproject.toml
        raise ConfigError(f"--app {app_dir}: {_one_line(err)}") from None
    return flatten_dict(project["tool"]["flwr"]["app"].get("config", {}))


@contextlib.contextmanager
def flwr_run_config(overrides: Mapping[str, UserConfigValue]) -> Iterator[list[str]]:
    """The `--run-config` values that hand `overrides` to `flwr run` as they are.

    One TOML file rather than the user's own arguments: Flower takes either a
    single TOML file or key=value strings, and merges several strings table by
    table, so `-c "model.name='a'" -c "model.quantization=0"` would lose model.name.
    """
    if not overrides:
        yield []
        return
    with tempfile.TemporaryDirectory(prefix="fedcoder-run-config-") as tmp:
        path = Path(tmp) / "run-config.toml"
        path.write_text(tomli_w.dumps(dict(overrides)), encoding="utf-8")
        yield [str(path)]


def _read_config_file(path: str, option: str = "--config") -> Overrides:
    where = f"{option} {path}"
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"{where}: no such file")
    # parse_config_args reads a single argument as a file only by its suffix.
    if not path.endswith(".toml"):
        raise ConfigError(f"{where}: expected a .toml file")
    try:
        return parse_config_args([path])
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 (bad byte at offset {err.start})") from None
    except ValueError as err:  # TOML syntax (tomli's error is a ValueError) or an array value
        raise ConfigError(f"{where}: {_one_line(err)}") from None


def _read_run_config(text: str) -> Overrides:
    if text.endswith(".toml"):  # `flwr run --run-config` takes a TOML file too
        return _read_config_file(text, option="--run-config")
    try:
        parsed = parse_config_args([text])
    except (click.ClickException, ValueError) as err:
        message = err.message if isinstance(err, click.ClickException) else str(err)
        raise ConfigError(f"--run-config {text!r}: {_one_line(message)}") from None
    if text.strip() and not parsed:
        raise ConfigError(f"--run-config {text!r}: expected KEY=VALUE pairs, e.g. 'train.seed=7'")
    return parsed


def _check_federation(config: RunConfig, num_supernodes: int) -> None:
    # Flower's sampling waits for min-train-nodes nodes to connect: with fewer
    # virtual clients the run would hang instead of failing.
    if num_supernodes < config.strategy.min_train_nodes:
        raise ConfigError(
            f"config key 'strategy.min-train-nodes': {config.strategy.min_train_nodes} clients "
            f"per round need --num-supernodes >= {config.strategy.min_train_nodes}, "
            f"got {num_supernodes}"
        )


def _check_dataset(config: RunConfig, num_supernodes: int) -> None:
    """Every row valid, and enough training rows for one partition per client.

    A local source is read by `fedcoder.sources`, without the `datasets` import that
    `fedcoder.data` pays; a Hub dataset is loaded as a client will load it.
    """
    from fedcoder import sources

    name, fraction, seed = config.data.name, config.data.holdout_fraction, config.train.seed
    if sources.source_kind(name) == "hub":
        from fedcoder.data import load_partition

        load_partition(name, 0, num_supernodes, seed=seed, holdout_fraction=fraction)
        return
    sources.check_fraction(fraction)
    training = sum(
        not sources.is_held_out(row["instruction"], row["input"], fraction, seed)
        for row in sources.read_rows(name)
    )
    sources.check_partition_count(name, training, num_supernodes)


def _check_model(config: RunConfig) -> None:
    from fedcoder.architecture import check_target_modules, checkpoint_module_names

    path = Path(config.model.name).expanduser()
    names = checkpoint_module_names(path) if path.is_dir() else None
    if names is None:
        from fedcoder.model import meta_model, module_names

        # The architecture on the meta device: no weights are read, yet the target
        # modules are checked against the real module names.
        names = module_names(meta_model(config.model.name))
    check_target_modules(names, config.model.lora)


def _check_validation_data(config: RunConfig) -> None:
    if not config.validation.every_rounds:
        return
    from fedcoder.evaluation.data import load_problems
    from fedcoder.validation import TASK

    data_dir = config.validation.data_dir
    load_problems(TASK, Path(data_dir) if data_dir else None)


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())

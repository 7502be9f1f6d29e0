"""Run configuration: read once, validate, and hand typed objects downstream.

Flower passes the app's config as a flat dict with dashed, dotted keys (the
FlowerTune key names, so users coming from FlowerTune find what they know).
`RunConfig.from_flat` is the only place that reads those keys; everything
else in fedcoder takes the dataclasses below. A bad value fails here, before
any model or dataset is loaded, with one line naming the key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


QUANTIZATION_CHOICES = (0, 4, 8)
# torch.compile backends for model.compile ("" = off): inductor generates fused kernels;
# aot_eager compiles the graphs but keeps eager kernels (checks that a model compiles).
COMPILE_BACKENDS = ("", "inductor", "aot_eager")
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw_torch")
TRANSPORT_DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
AGGREGATIONS = ("fedavg", "trimmed-mean", "median")
# Set by `fedcoder run` for its ServerApp: a file to create once every round is done, so
# the launcher knows the run completed without asking the SuperLink (`flwr ls`, 1-2 s).
COMPLETED_FILE_ENV = "FEDCODER_COMPLETED_FILE"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 64
    dropout: float = 0.075
    use_dora: bool = True
    target_modules: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSettings:
    name: str = "microsoft/Phi-4-mini-instruct"
    quantization: int = 4
    # Off: the same update, faster; train.micro-batch-tokens bounds the memory instead.
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    # torch.compile the resident model's decoder layers with this backend ("" = off): the
    # same math, 1.6x the tokens/s on an H100, after a compile of minutes in round 1.
    compile: str = ""
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass(frozen=True)
class TrainSettings:
    seq_length: int = 512
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = 10
    max_grad_norm: float = 1.0
    # The same AdamW8bit as paged_adamw_8bit; paging buys nothing for an adapter's state.
    optim: str = "adamw_8bit"
    bf16: bool = True
    learning_rate_max: float = 5e-5
    learning_rate_min: float = 5e-6
    save_every_round: int = 5
    dynamic_data_seed: bool = True
    seed: int = 42
    transport_dtype: str = "float32"
    # Most tokens (padding included) per forward pass; a step's batch is split into
    # micro-batches under it, with the same update. 0: the whole batch in one pass.
    micro_batch_tokens: int = 4096
    packing: bool = True
    # Replay each micro-batch shape's forward and backward as a CUDA graph (same math).
    cuda_graphs: bool = True

    @property
    def examples_per_round(self) -> int:
        return self.max_steps * self.batch_size * self.gradient_accumulation_steps


@dataclass(frozen=True)
class StrategySettings:
    fraction_train: float = 0.2
    min_train_nodes: int = 2
    # A round aggregates the valid replies that arrived if there are at least
    # this many; otherwise it is retried with a fresh sample.
    min_train_replies: int = 1
    max_round_retries: int = 2
    round_timeout: float = 0.0  # seconds; 0 waits for every reply
    aggregation: str = "fedavg"
    trim_fraction: float = 0.2  # per side, for aggregation = "trimmed-mean"


@dataclass(frozen=True)
class ValidationSettings:
    """Score the global adapter by executed code during training (MBPP validation split)."""

    every_rounds: int = 0  # 0: off
    num_problems: int = 90  # the first N of MBPP task_id 511-600
    max_new_tokens: int = 512
    data_dir: str = ""  # a directory with mbpp.jsonl; "" reads the Hugging Face Hub


@dataclass(frozen=True)
class DataSettings:
    name: str = "flwrlabs/code-alpaca-20k"
    holdout_fraction: float = 0.0


@dataclass(frozen=True)
class ResultsSettings:
    dir: str = "results"
    run_name: str = ""
    # Continue results/<run-name>/ from its last completed round if it exists.
    resume: bool = False


@dataclass(frozen=True)
class RunConfig:
    num_server_rounds: int = 10
    strategy: StrategySettings = field(default_factory=StrategySettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    results: ResultsSettings = field(default_factory=ResultsSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build a validated config from Flower's flat run config.

        Missing keys take the FlowerTune baseline defaults; unknown keys and
        bad values raise `ConfigError` naming the key.
        """
        unknown = sorted(set(flat) - set(_KEYS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], _KEYS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown config key '{unknown[0]}' ({hint}the keys are listed under "
                "[tool.flwr.app.config] in pyproject.toml and in the README)"
            )
        values = {
            key: spec.read(key, flat[key]) if key in flat else spec.default
            for key, spec in _KEYS.items()
        }
        config = cls(
            num_server_rounds=values["num-server-rounds"],
            strategy=StrategySettings(
                fraction_train=values["strategy.fraction-train"],
                min_train_nodes=values["strategy.min-train-nodes"],
                min_train_replies=values["strategy.min-train-replies"],
                max_round_retries=values["strategy.max-round-retries"],
                round_timeout=values["strategy.round-timeout"],
                aggregation=values["strategy.aggregation"],
                trim_fraction=values["strategy.trim-fraction"],
            ),
            model=ModelSettings(
                name=values["model.name"],
                quantization=values["model.quantization"],
                gradient_checkpointing=values["model.gradient-checkpointing"],
                attn_implementation=values["model.attn-implementation"],
                compile=values["model.compile"],
                lora=LoraSettings(
                    r=values["model.lora.peft-lora-r"],
                    alpha=values["model.lora.peft-lora-alpha"],
                    dropout=values["model.lora.peft-lora-dropout"],
                    use_dora=values["model.lora.peft-use-dora"],
                    target_modules=values["model.lora.target-modules"],
                ),
            ),
            train=TrainSettings(
                seq_length=values["train.seq-length"],
                batch_size=values[f"{_TA}.per-device-train-batch-size"],
                gradient_accumulation_steps=values[f"{_TA}.gradient-accumulation-steps"],
                max_steps=values[f"{_TA}.max-steps"],
                max_grad_norm=values[f"{_TA}.max-grad-norm"],
                optim=values[f"{_TA}.optim"],
                bf16=values[f"{_TA}.bf16"],
                learning_rate_max=values["train.learning-rate-max"],
                learning_rate_min=values["train.learning-rate-min"],
                save_every_round=values["train.save-every-round"],
                dynamic_data_seed=values["train.dynamic-data-seed"],
                seed=values["train.seed"],
                transport_dtype=values["train.transport-dtype"],
                micro_batch_tokens=values["train.micro-batch-tokens"],
                packing=values["train.packing"],
                cuda_graphs=values["train.cuda-graphs"],
            ),
            data=DataSettings(
                name=values["static.dataset.name"],
                holdout_fraction=values["dataset.holdout-fraction"],
            ),
            results=ResultsSettings(
                dir=values["results.dir"],
                run_name=values["results.run-name"],
                resume=values["results.resume"],
            ),
            validation=ValidationSettings(
                every_rounds=values["validation.every-rounds"],
                num_problems=values["validation.num-problems"],
                max_new_tokens=values["validation.max-new-tokens"],
                data_dir=values["validation.data-dir"],
            ),
        )
        if config.train.learning_rate_min > config.train.learning_rate_max:
            raise ConfigError(
                f"config key 'train.learning-rate-min': {config.train.learning_rate_min} is "
                f"greater than train.learning-rate-max {config.train.learning_rate_max}"
            )
        if config.strategy.min_train_replies > config.strategy.min_train_nodes:
            raise ConfigError(
                f"config key 'strategy.min-train-replies': {config.strategy.min_train_replies} "
                f"is greater than strategy.min-train-nodes {config.strategy.min_train_nodes}, "
                "so no round could ever be aggregated"
            )
        if config.results.resume and not config.results.run_name:
            raise ConfigError(
                "config key 'results.resume': true needs results.run-name, the run to continue"
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """A stable hash of every setting, used to refuse resuming a different run.

        `results.resume` is left out: it says how to start, not what the run is.
        """
        settings = self.to_dict()
        settings["results"].pop("resume")
        blob = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def default_flat_config() -> dict[str, Any]:
    """The defaults as Flower's flat run config (what pyproject.toml declares)."""
    return {key: spec.flat_default for key, spec in _KEYS.items()}


# --- the key table -----------------------------------------------------------------------------
# Each key once: its type, default and check. Kept as data so the unknown-key
# check, the defaults and `fedcoder config` cannot drift apart.

_TA = "train.training-arguments"


@dataclass(frozen=True)
class _Key:
    kind: type
    default: Any
    check: Callable[[Any], str | None] = lambda value: None
    parse: Callable[[Any], Any] = lambda value: value

    @property
    def flat_default(self) -> Any:
        if isinstance(self.default, tuple):
            return ",".join(self.default)
        return self.default

    def read(self, key: str, raw: Any) -> Any:
        value = _coerce(key, raw, self.kind)
        problem = self.check(value)
        if problem:
            raise ConfigError(f"config key '{key}': {problem}, got {raw!r}")
        return self.parse(value)


def _coerce(key: str, raw: Any, kind: type) -> Any:
    # TOML gives ints for `1` and floats for `1.0`; accept an int where a float is meant.
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if kind is int and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if not isinstance(raw, kind) or (kind is int and isinstance(raw, bool)):
        raise ConfigError(f"config key '{key}': expected {kind.__name__}, got {raw!r}")
    return raw


def _positive(value: float) -> str | None:
    return None if value > 0 and math.isfinite(value) else "must be a finite number > 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 and math.isfinite(value) else "must be a finite number >= 0"


def _one_of(choices: tuple) -> Callable[[Any], str | None]:
    return lambda value: None if value in choices else f"must be one of {list(choices)}"


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _modules(value: str) -> str | None:
    names = [name.strip() for name in value.split(",")]
    return None if all(names) else "must be a comma-separated list of module names"


_KEYS: dict[str, _Key] = {
    "num-server-rounds": _Key(int, RunConfig.num_server_rounds, _positive),
    "strategy.fraction-train": _Key(
        float,
        StrategySettings.fraction_train,
        lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    ),
    "strategy.min-train-nodes": _Key(int, StrategySettings.min_train_nodes, _positive),
    "strategy.min-train-replies": _Key(int, StrategySettings.min_train_replies, _positive),
    "strategy.max-round-retries": _Key(int, StrategySettings.max_round_retries, _non_negative),
    "strategy.round-timeout": _Key(float, StrategySettings.round_timeout, _non_negative),
    "strategy.aggregation": _Key(str, StrategySettings.aggregation, _one_of(AGGREGATIONS)),
    "strategy.trim-fraction": _Key(
        float,
        StrategySettings.trim_fraction,
        lambda v: None if 0 <= v < 0.5 else "must be in [0, 0.5)",
    ),
    "model.name": _Key(str, ModelSettings.name, _non_empty),
    "model.quantization": _Key(int, ModelSettings.quantization, _one_of(QUANTIZATION_CHOICES)),
    "model.gradient-checkpointing": _Key(bool, ModelSettings.gradient_checkpointing),
    "model.attn-implementation": _Key(
        str, ModelSettings.attn_implementation, _one_of(ATTN_IMPLEMENTATIONS)
    ),
    "model.compile": _Key(str, ModelSettings.compile, _one_of(COMPILE_BACKENDS)),
    "model.lora.peft-lora-r": _Key(int, LoraSettings.r, _positive),
    "model.lora.peft-lora-alpha": _Key(int, LoraSettings.alpha, _positive),
    "model.lora.peft-lora-dropout": _Key(
        float, LoraSettings.dropout, lambda v: None if 0 <= v < 1 else "must be in [0, 1)"
    ),
    "model.lora.peft-use-dora": _Key(bool, LoraSettings.use_dora),
    "model.lora.target-modules": _Key(
        str,
        LoraSettings.target_modules,
        _modules,
        lambda v: tuple(name.strip() for name in v.split(",")),
    ),
    "train.seq-length": _Key(int, TrainSettings.seq_length, _positive),
    "train.learning-rate-max": _Key(float, TrainSettings.learning_rate_max, _positive),
    "train.learning-rate-min": _Key(float, TrainSettings.learning_rate_min, _non_negative),
    "train.save-every-round": _Key(int, TrainSettings.save_every_round, _positive),
    "train.dynamic-data-seed": _Key(bool, TrainSettings.dynamic_data_seed),
    "train.seed": _Key(int, TrainSettings.seed, _non_negative),
    "train.transport-dtype": _Key(str, TrainSettings.transport_dtype, _one_of(TRANSPORT_DTYPES)),
    "train.micro-batch-tokens": _Key(int, TrainSettings.micro_batch_tokens, _non_negative),
    "train.packing": _Key(bool, TrainSettings.packing),
    "train.cuda-graphs": _Key(bool, TrainSettings.cuda_graphs),
    f"{_TA}.per-device-train-batch-size": _Key(int, TrainSettings.batch_size, _positive),
    f"{_TA}.gradient-accumulation-steps": _Key(
        int, TrainSettings.gradient_accumulation_steps, _positive
    ),
    f"{_TA}.max-steps": _Key(int, TrainSettings.max_steps, _positive),
    f"{_TA}.max-grad-norm": _Key(float, TrainSettings.max_grad_norm, _positive),
    f"{_TA}.optim": _Key(str, TrainSettings.optim, _one_of(OPTIMIZERS)),
    f"{_TA}.bf16": _Key(bool, TrainSettings.bf16),
    "static.dataset.name": _Key(str, DataSettings.name, _non_empty),
    "dataset.holdout-fraction": _Key(
        float, DataSettings.holdout_fraction, lambda v: None if 0 <= v < 1 else "must be in [0, 1)"
    ),
    "results.dir": _Key(str, ResultsSettings.dir, _non_empty),
    "results.run-name": _Key(
        str,
        ResultsSettings.run_name,
        lambda v: None if "/" not in v and v not in (".", "..") else "must be a plain name",
    ),
    "results.resume": _Key(bool, ResultsSettings.resume),
    "validation.every-rounds": _Key(int, ValidationSettings.every_rounds, _non_negative),
    "validation.num-problems": _Key(
        int,
        ValidationSettings.num_problems,
        lambda v: None if 1 <= v <= 90 else "must be in [1, 90] (MBPP task_id 511-600)",
    ),
    "validation.max-new-tokens": _Key(int, ValidationSettings.max_new_tokens, _positive),
    "validation.data-dir": _Key(str, ValidationSettings.data_dir),
}

"""What a run leaves behind: `results/<run>/` with config, metrics, loss plot and checkpoints.

Every file is written to a temporary name and renamed into place, so a run
killed mid-write never leaves a half-written file that looks complete, and a
run that fails validation creates nothing at all. `state/` holds what a
resumed run continues from (`fedcoder.run_state`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcoder.config import ConfigError, LoraSettings, RunConfig
from fedcoder.run_state import RunState, atomic_write, load_state, save_state

if TYPE_CHECKING:
    import torch

BEST_LINK = "peft_best"


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_adapter(
    directory: Path, state: dict[str, torch.Tensor], lora: LoraSettings, base_model: str
) -> None:
    """Write a PEFT adapter directory that `PeftModel.from_pretrained` loads.

    The server holds only the adapter tensors (no model), so this writes the
    two files PEFT's `save_pretrained` would: adapter_config.json and
    adapter_model.safetensors, with PEFT's own key names.
    """
    # Imported here: `fedcoder run`'s preflight imports this module for
    # check_run_directory, before Flower starts, and needs neither torch nor transformers.
    from safetensors.torch import save_file

    from fedcoder.model import lora_config

    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    config = lora_config(lora)
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(staging))
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(staging / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)


def run_path(config: RunConfig) -> Path:
    name = config.results.run_name or time.strftime("%Y-%m-%d_%H-%M-%S")
    return Path(config.results.dir).expanduser().resolve() / name


def check_run_directory(config: RunConfig) -> None:
    """Refuse, creating nothing, a run directory this config may not write into.

    An existing one is never overwritten; with `results.resume` it must have
    been made by the same config.
    """
    results = Path(config.results.dir).expanduser()
    if results.exists() and not results.is_dir():
        raise ConfigError(f"config key 'results.dir': {results} exists and is not a directory")
    path = run_path(config)
    if not path.exists():
        return
    if not config.results.resume:
        raise ConfigError(
            f"config key 'results.run-name': {path} already exists; choose another "
            "name so earlier results are not overwritten, or set results.resume=true"
        )
    _check_same_config(path, config)


def _check_same_config(path: Path, config: RunConfig) -> None:
    try:
        saved = json.loads((path / "config.json").read_text())["fingerprint"]
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"cannot resume {path}: unreadable config.json ({error})") from error
    if saved != config.fingerprint():
        raise ConfigError(
            f"config key 'results.resume': {path} was made by a different config "
            f"(fingerprint {saved}, this config {config.fingerprint()}); resume with the "
            "settings in its config.json, or choose a new results.run-name"
        )


class RunDirectory:
    """`results/<run>/`: created only after the config has been validated."""

    def __init__(self, path: Path, config: RunConfig) -> None:
        self.path = path
        self.config = config
        self.rounds: list[dict[str, Any]] = []

    @classmethod
    def open(cls, config: RunConfig) -> tuple[RunDirectory, RunState | None]:
        """Create the run directory, or with `results.resume` reopen it at its saved state.

        Returns the directory and the state to continue from (None: start at round 1).
        """
        path = run_path(config)
        run = cls(path, config)
        check_run_directory(config)
        if path.exists():
            state = load_state(path / "state", config.fingerprint())
            if state is not None:
                run.rounds = state.rounds
                run._write_metrics()
            return run, state
        path.mkdir(parents=True)
        payload = {"fingerprint": config.fingerprint(), "config": config.to_dict()}
        atomic_write_text(path / "config.json", json.dumps(payload, indent=2) + "\n")
        return run, None

    def record_round(self, entry: dict[str, Any]) -> None:
        self.rounds.append(entry)
        self._write_metrics()

    def save_state(self, state: RunState) -> None:
        """Persist the run after a completed round (after `record_round`)."""
        save_state(self.path / "state", state)

    def best_round(self) -> dict[str, Any] | None:
        """The round with the highest validation pass@1 (the earliest on ties)."""
        validated = [r for r in self.rounds if "validation" in r]
        return max(validated, key=lambda r: r["validation"]["pass@1"], default=None)

    def _write_metrics(self) -> None:
        metrics: dict[str, Any] = {
            "run": self.path.name,
            "fingerprint": self.config.fingerprint(),
            "rounds": self.rounds,
        }
        best = self.best_round()
        if best is not None:
            metrics["best"] = {
                "round": best["round"],
                "pass@1": best["validation"]["pass@1"],
                "checkpoint": best.get("checkpoint"),
            }
            if best.get("checkpoint"):
                self._link_best(best["checkpoint"])
        atomic_write_text(self.path / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        self.plot_loss()

    def _link_best(self, checkpoint: str) -> None:
        # A relative symlink swapped in atomically: `--adapter results/<run>/peft_best`.
        tmp = self.path / f".{BEST_LINK}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(checkpoint)
        os.replace(tmp, self.path / BEST_LINK)

    def save_checkpoint(
        self, server_round: int, state: dict[str, torch.Tensor], base_model: str
    ) -> Path:
        directory = self.checkpoint_dir(server_round)
        save_adapter(directory, state, self.config.model.lora, base_model)
        return directory

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.path / f"peft_{server_round}"

    def plot_loss(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rounds]
        fig, ax = plt.subplots(figsize=(6, 4))
        lines = ax.plot(
            rounds, [r["train_loss"] for r in self.rounds], marker="o", label="train loss"
        )
        validated = [r for r in self.rounds if "validation" in r]
        if validated:
            # pass@1 has its own scale (percent), so it gets the right-hand axis.
            right = ax.twinx()
            lines += right.plot(
                [r["round"] for r in validated],
                [100 * r["validation"]["pass@1"] for r in validated],
                marker="s",
                color="tab:green",
                label="MBPP validation pass@1",
            )
            right.set_ylabel("MBPP validation pass@1 (%)")
            right.set_ylim(bottom=0)
        ax.set_xlabel("server round")
        ax.set_ylabel("example-weighted train loss")
        ax.set_title(f"fedcoder {self.path.name}")
        ax.grid(alpha=0.3)
        ax.legend(handles=lines)
        fig.tight_layout()
        tmp = self.path / ".train_loss.png.tmp.png"
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, self.path / "train_loss.png")

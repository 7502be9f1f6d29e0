"""What a run leaves behind: `results/<run>/` with config, metrics, loss plot and checkpoints.

Every file is written to a temporary name and renamed into place, so a run
killed mid-write never leaves a half-written file that looks complete, and a
run that fails validation creates nothing at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedcoder.config import ConfigError, LoraSettings, RunConfig
from fedcoder.model import lora_config


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_adapter(
    directory: Path, state: dict[str, torch.Tensor], lora: LoraSettings, base_model: str
) -> None:
    """Write a PEFT adapter directory that `PeftModel.from_pretrained` loads.

    The server holds only the adapter tensors (no model), so this writes the
    two files PEFT's `save_pretrained` would: adapter_config.json and
    adapter_model.safetensors, with PEFT's own key names.
    """
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


class RunDirectory:
    """`results/<run>/`: created only after the config has been validated."""

    def __init__(self, path: Path, config: RunConfig) -> None:
        self.path = path
        self.config = config
        self.rounds: list[dict[str, Any]] = []

    @classmethod
    def create(cls, config: RunConfig) -> RunDirectory:
        name = config.results.run_name or time.strftime("%Y-%m-%d_%H-%M-%S")
        path = Path(config.results.dir).expanduser().resolve() / name
        if path.exists():
            raise ConfigError(
                f"config key 'results.run-name': {path} already exists; choose another name "
                "so earlier results are not overwritten"
            )
        path.mkdir(parents=True)
        run = cls(path, config)
        payload = {"fingerprint": config.fingerprint(), "config": config.to_dict()}
        atomic_write_text(path / "config.json", json.dumps(payload, indent=2) + "\n")
        return run

    def record_round(self, entry: dict[str, Any]) -> None:
        self.rounds.append(entry)
        metrics = {
            "run": self.path.name,
            "fingerprint": self.config.fingerprint(),
            "rounds": self.rounds,
        }
        atomic_write_text(self.path / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        self.plot_loss()

    def save_checkpoint(
        self, server_round: int, state: dict[str, torch.Tensor], base_model: str
    ) -> Path:
        directory = self.path / f"peft_{server_round}"
        save_adapter(directory, state, self.config.model.lora, base_model)
        return directory

    def plot_loss(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rounds]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rounds, [r["train_loss"] for r in self.rounds], marker="o", label="train loss")
        ax.set_xlabel("server round")
        ax.set_ylabel("example-weighted train loss")
        ax.set_title(f"fedcoder {self.path.name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.path / ".train_loss.png.tmp.png"
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, self.path / "train_loss.png")

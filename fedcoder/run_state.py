"""Crash-safe run state: all a run needs to continue from its last completed round.

`results/<run>/state/` holds

    adapter_round_0003.safetensors   the global adapter after round 3
    state.json                       round, sampling-RNG state, byte counters, the
                                     metrics history, the config fingerprint, and the
                                     name and SHA-256 of the adapter file it goes with

After each round the new adapter file is written and synced first, then
`state.json` is replaced atomically, then older adapter files are removed. A
kill at any point therefore leaves a `state.json` that names a complete adapter
file; a half-written file is never named, and its hash is checked on load.

torch is imported only where a tensor is read or written: `fedcoder run`'s preflight
checks the run directory (`fedcoder.results`) before Flower starts, without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcoder.config import ConfigError

if TYPE_CHECKING:
    import torch

STATE_FILE = "state.json"
FORMAT = 1


@dataclass
class RunState:
    """Where a run stands after `round` completed rounds."""

    round: int
    adapter: dict[str, torch.Tensor]
    rng_state: tuple
    bytes_down: int
    bytes_up: int
    rounds: list[dict[str, Any]]
    fingerprint: str


def save_state(directory: Path, state: RunState) -> None:
    from safetensors.torch import save_file  # torch: see the module docstring

    directory.mkdir(exist_ok=True)
    adapter_file = f"adapter_round_{state.round:04d}.safetensors"
    atomic_write(
        directory / adapter_file,
        lambda tmp: save_file({k: v.contiguous() for k, v in state.adapter.items()}, tmp),
    )
    version, internal, gauss = state.rng_state
    payload = {
        "format": FORMAT,
        "round": state.round,
        "fingerprint": state.fingerprint,
        "adapter_file": adapter_file,
        "adapter_sha256": _sha256(directory / adapter_file),
        "rng_state": [version, list(internal), gauss],
        "bytes_down": state.bytes_down,
        "bytes_up": state.bytes_up,
        "rounds": state.rounds,
    }
    text = json.dumps(payload, indent=1) + "\n"
    atomic_write(directory / STATE_FILE, lambda tmp: Path(tmp).write_text(text))
    for old in directory.glob("adapter_round_*.safetensors"):
        if old.name != adapter_file:
            old.unlink()


def load_state(directory: Path, fingerprint: str) -> RunState | None:
    """The saved state, or None if no round completed; refuses another config's state."""
    from safetensors.torch import load_file  # torch: see the module docstring

    path = directory / STATE_FILE
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
        adapter_path = directory / payload["adapter_file"]
        if _sha256(adapter_path) != payload["adapter_sha256"]:
            raise ValueError(f"{adapter_path.name} does not match its recorded SHA-256")
        version, internal, gauss = payload["rng_state"]
        state = RunState(
            round=int(payload["round"]),
            adapter=load_file(str(adapter_path)),
            rng_state=(version, tuple(internal), gauss),
            bytes_down=int(payload["bytes_down"]),
            bytes_up=int(payload["bytes_up"]),
            rounds=list(payload["rounds"]),
            fingerprint=str(payload["fingerprint"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"cannot resume from {path}: {error}") from error
    if state.fingerprint != fingerprint:
        raise ConfigError(
            f"config key 'results.resume': {path} belongs to another config "
            f"(fingerprint {state.fingerprint}, this config {fingerprint})"
        )
    return state


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, sync it, rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk before the next file names it.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

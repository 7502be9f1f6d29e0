"""Crash-safe run state: a kill at any moment leaves a state that loads, and never a torn one."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedcoder.architecture import ModelError
from fedcoder.config import ConfigError, RunConfig
from fedcoder.results import RunDirectory
from fedcoder.run_state import STATE_FILE, RunState, load_state, save_state
from fedcoder.server_app import open_run

# A child process saves round after round until it is SIGKILLed. Each round's
# adapter is a pure function of the round, so the parent can check that
# whatever state survives is whole: the adapter is the one of the round named.
WRITER = """
import sys, random, torch
from pathlib import Path
from fedcoder.run_state import RunState, save_state

def adapter(r):
    g = torch.Generator().manual_seed(r)
    return {f"layer{i}.lora_A.weight": torch.randn(256, 256, generator=g) for i in range(8)}

rng = random.Random(0)
for r in range(1, 10**6):
    rng.random()
    save_state(Path(sys.argv[1]), RunState(r, adapter(r), rng.getstate(), r, 2 * r,
               [{"round": k} for k in range(1, r + 1)], "abc"))
"""


def _adapter(server_round: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(server_round)
    return {f"layer{i}.lora_A.weight": torch.randn(256, 256, generator=g) for i in range(8)}


def _state(server_round: int, fingerprint: str = "abc") -> RunState:
    rng = random.Random(0)
    return RunState(server_round, _adapter(server_round), rng.getstate(), 1, 2, [], fingerprint)


def test_state_round_trips(tmp_path):
    saved = _state(3)
    saved.rng_state = random.Random(7).getstate()
    save_state(tmp_path, saved)
    loaded = load_state(tmp_path, "abc")
    assert loaded.round == 3 and (loaded.bytes_down, loaded.bytes_up) == (1, 2)
    assert all(torch.equal(loaded.adapter[k], saved.adapter[k]) for k in saved.adapter)
    restored = random.Random()
    restored.setstate(loaded.rng_state)
    assert restored.random() == random.Random(7).random()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_round_0003.safetensors",
        STATE_FILE,
    ]


@pytest.mark.parametrize("trial", range(6))
def test_sigkill_while_saving_never_leaves_a_torn_state(tmp_path, trial):
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
    deadline = time.monotonic() + 60
    while not (tmp_path / STATE_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(trial).uniform(0.0, 1.5))  # land anywhere in a save
    child.send_signal(signal.SIGKILL)
    child.wait()
    state = load_state(tmp_path, "abc")
    assert state is not None and state.round >= 1
    expected = _adapter(state.round)
    assert all(torch.equal(state.adapter[k], expected[k]) for k in expected)
    assert [r["round"] for r in state.rounds] == list(range(1, state.round + 1))
    assert (state.bytes_down, state.bytes_up) == (state.round, 2 * state.round)


def test_a_half_written_newer_adapter_is_ignored(tmp_path):
    save_state(tmp_path, _state(2))
    (tmp_path / "adapter_round_0003.safetensors").write_bytes(b"\x00" * 100)  # torn write
    (tmp_path / f".{STATE_FILE}.partial").write_text('{"round": 3')
    assert load_state(tmp_path, "abc").round == 2


def test_a_corrupted_adapter_is_refused_not_used(tmp_path):
    save_state(tmp_path, _state(2))
    path = tmp_path / "adapter_round_0002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="SHA-256"):
        load_state(tmp_path, "abc")


def _config(tmp_path: Path, **overrides) -> RunConfig:
    flat = {"results.dir": str(tmp_path), "results.run-name": "r", **overrides}
    return RunConfig.from_flat(flat)


def test_resume_refuses_a_different_config(tmp_path):
    run, state = RunDirectory.open(_config(tmp_path, **{"results.resume": True}))
    assert state is None
    run.save_state(_state(1, run.config.fingerprint()))
    changed = _config(tmp_path, **{"results.resume": True, "train.learning-rate-max": 1e-4})
    with pytest.raises(ConfigError, match="different config"):
        RunDirectory.open(changed)


def test_resume_restores_metrics_history(tmp_path):
    config = _config(tmp_path, **{"results.resume": True})
    run, _ = RunDirectory.open(config)
    for r in (1, 2, 3):
        run.record_round({"round": r, "train_loss": 1.0 / r})
    state = _state(2, run.config.fingerprint())
    state.rounds = run.rounds[:2]  # killed after round 3's metrics, before its state
    run.save_state(state)
    reopened, saved = RunDirectory.open(config)
    assert saved.round == 2
    metrics = json.loads((reopened.path / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]


def test_a_resumed_run_starts_from_its_saved_adapter_without_reading_the_model(tmp_path):
    # An unusable model name: a run that had to build the initial adapter would fail.
    unusable = {"results.resume": True, "model.name": "builtin:no-such-model"}
    config = _config(tmp_path, **unusable)
    run, _ = RunDirectory.open(config)
    run.save_state(_state(2, config.fingerprint()))
    _, saved, initial = open_run(config)
    assert saved.round == 2
    assert initial.keys() == saved.adapter.keys()
    assert all(torch.equal(initial[k], saved.adapter[k]) for k in initial)

    # Resumed before any round was saved: it starts at round 1, so it needs the model.
    unsaved = _config(tmp_path, **{**unusable, "results.run-name": "unsaved"})
    RunDirectory.open(unsaved)
    with pytest.raises(ModelError, match="unknown builtin model"):
        open_run(unsaved)

    # A new run builds it, before its directory exists: the error leaves nothing behind.
    fresh = _config(tmp_path, **{**unusable, "results.run-name": "fresh"})
    with pytest.raises(ModelError, match="unknown builtin model"):
        open_run(fresh)
    assert not (tmp_path / "fresh").exists()


def test_existing_run_without_resume_is_refused_and_untouched(tmp_path):
    run, _ = RunDirectory.open(_config(tmp_path))
    run.record_round({"round": 1, "train_loss": 1.0})
    before = (run.path / "metrics.json").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        RunDirectory.open(_config(tmp_path))
    assert (run.path / "metrics.json").read_bytes() == before


def test_best_validation_round_is_marked(tmp_path):
    run, _ = RunDirectory.open(_config(tmp_path))
    for r, score in ((1, 0.2), (2, 0.5), (3, 0.4)):
        (run.path / f"peft_{r}").mkdir()
        run.record_round({"round": r, "train_loss": 1.0, "checkpoint": f"peft_{r}",
                          "validation": {"pass@1": score}})  # fmt: skip
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["best"] == {"round": 2, "pass@1": 0.5, "checkpoint": "peft_2"}
    assert (run.path / "peft_best").resolve() == (run.path / "peft_2").resolve()

"""The FlowerTune baseline's app (bench/flowertune_reference), which fedcoder's end-to-end
time is compared with, runs through the same launcher and does what the baseline does."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_addition_data

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_the_reference_app_runs_its_rounds_through_flower_reloading_the_model(
    tiny_model_dir, tmp_path
):
    data = write_addition_data(tmp_path / "data.jsonl", rows=60)
    result = subprocess.run(
        ["bash", "bench/federated_wall_time.sh", str(data), str(tmp_path / "out"),
         "num-server-rounds=3 max-steps=2 batch-size=2 save-every-round=2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "RECIPE": "reference", "CLIENT_GPUS": "0",
             "PHI4MINI_DIR": str(tiny_model_dir),
             # The script runs `python3`: this interpreter's.
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "reference run wall time:" in result.stdout
    metrics = json.loads((tmp_path / "out" / "reference-metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    for r in metrics["rounds"]:
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        # The baseline loads its base model for every train message: never 0, as a
        # resident model's later rounds are.
        assert r["load-seconds"] > 0
        assert r["seconds"] >= r["load-seconds"] + r["train-seconds"]
    assert metrics["initial_adapter_seconds"] > 0

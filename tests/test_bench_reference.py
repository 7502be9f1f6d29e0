"""The FlowerTune baseline's app (bench/flowertune_reference), which fedcoder's end-to-end
time is compared with, runs through the same launcher as fedcoder, the same experiment,
and does what the baseline does."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_addition_data

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_both_recipes_run_the_same_experiment_through_flower_side_by_side(tiny_model_dir, tmp_path):
    data = write_addition_data(tmp_path / "data.jsonl", rows=60)
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "bench/federated_wall_time.sh", str(data), str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
        env={**os.environ, "RECIPE": "both", "ROUNDS": "3", "STEPS": "2", "BATCH": "2",
             "SAVE_EVERY": "2", "CLIENT_GPUS": "0", "REFERENCE_CLIENT_GPUS": "0",
             "PHI4MINI_DIR": str(tiny_model_dir),
             # The script runs `python3`: this interpreter's.
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    reference = json.loads((out / "reference-metrics.json").read_text())
    assert [r["round"] for r in reference["rounds"]] == [1, 2, 3]
    for r in reference["rounds"]:
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        # The baseline loads its base model for every train message: never 0, as a
        # resident model's later rounds are.
        assert r["load-seconds"] > 0
        assert r["seconds"] >= r["load-seconds"] + r["train-seconds"]
    assert reference["initial_adapter_seconds"] > 0

    # fedcoder ran the same experiment: the rounds, steps and batch size given once.
    fedcoder = json.loads((out / "fedcoder-metrics.json").read_text())
    assert [r["round"] for r in fedcoder["rounds"]] == [1, 2, 3]
    for r in fedcoder["rounds"]:
        assert [c["steps"] for c in r["clients"]] == [2, 2]
        assert [c["examples"] for c in r["clients"]] == [4, 4]  # steps x batch

    walls = {
        recipe: float(re.search(rf"^{recipe} run wall time: ([\d.]+) s$", result.stdout, re.M)[1])
        for recipe in ("reference", "fedcoder")
    }
    speedup = re.search(r"^fedcoder end to end: ([\d.]+)x the reference$", result.stdout, re.M)
    assert float(speedup[1]) == pytest.approx(walls["reference"] / walls["fedcoder"], abs=0.01)

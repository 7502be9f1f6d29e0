"""Each simulated client trains on a GPU of its own, with one resident base model per GPU.

Needs CUDA (skipped elsewhere). Run on a GPU host, e.g. with one GPU:
    CUDA_VISIBLE_DEVICES=0 python -m pytest tests/test_gpu_placement.py
and on a host with several, to see the sampled clients of a round on different GPUs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_clients_get_their_own_gpu_and_keep_the_model_resident(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(
        json.dumps({"instruction": f"Add {i}.", "input": "", "output": f"x + {i}"}) + "\n"
        for i in range(200)
    ))  # fmt: skip
    rounds = 3
    overrides = {
        "num-server-rounds": rounds,
        "model.name": str(tiny_model_dir),
        "model.quantization": 0,
        "static.dataset.name": str(data),
        "train.seq-length": 64,
        "train.training-arguments.per-device-train-batch-size": 2,
        "train.training-arguments.max-steps": 2,
        "train.training-arguments.optim": "adamw_torch",
        "results.dir": str(tmp_path / "results"),
        "results.run-name": "gpu",
    }
    config = tmp_path / "run.toml"
    config.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in overrides.items()))
    result = subprocess.run(
        [sys.executable, "-m", "fedcoder.cli", "run", "--app", str(ROOT), "--config",
         str(config), "--flwr-home", str(tmp_path / "flwr-home"), "--num-supernodes", "4"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "results" / "gpu" / "metrics.json").read_text())

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    host_gpus = (
        [int(i) for i in visible.split(",")] if visible else list(range(torch.cuda.device_count()))
    )
    gpu_of_worker: dict[int, int] = {}
    for r in metrics["rounds"]:
        gpus = [client["gpu"] for client in r["clients"]]
        assert all(gpu in host_gpus for gpu in gpus), (gpus, host_gpus)
        if len(host_gpus) >= len(gpus):  # enough GPUs: the round's clients never share one
            assert len(set(gpus)) == len(gpus), gpus
        for client in r["clients"]:
            # A worker process keeps its GPU, and its base model stays loaded there.
            pid = client["worker-pid"]
            if pid in gpu_of_worker:
                assert client["model-load-seconds"] == 0.0
            assert gpu_of_worker.setdefault(pid, client["gpu"]) == client["gpu"]
    assert len(gpu_of_worker) <= len(host_gpus)
    assert sum(len(r["clients"]) for r in metrics["rounds"]) > len(gpu_of_worker)  # reuse seen

"""Reliability in a real Flower simulation (tiny Phi3 model, 10 virtual clients).

- A server SIGKILLed (with its SuperLink, workers and all) at several points and
  resumed ends with the same final adapter, bit for bit, the same metrics and
  the same byte totals as a run that was never interrupted.
- Clients that raise, hang past the round timeout or send NaNs do not stop the
  run: a round aggregates the valid replies if there are enough, and is retried
  with a fresh sample otherwise; metrics.json records it all. (A client process
  killed mid-round is tested in deployment, tests/test_deployment.py: Flower
  1.42's Simulation Engine removes a dead Ray worker but keeps routing messages
  to it, so that case cannot be recovered inside a simulation.)
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from fedcoder.processes import processes_with_home

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 4

pytestmark = pytest.mark.slow

# Stand-in ClientApp for the fault test: fedcoder's own client, except that
# some partitions misbehave whenever they are sampled.
FAULTY_CLIENT = """
import os, time
import torch
from flwr.clientapp import ClientApp
import fedcoder.client_app as real
from fedcoder.communication import decode, encode

FAULTS = {faults!r}
app = ClientApp()
app.query()(real.identify)


@app.train()
def train(msg, context):
    fault = FAULTS.get(int(context.node_config["partition-id"]))
    if fault == "raise":
        raise RuntimeError("injected client failure")
    if fault == "hang":
        time.sleep({hang_s})
    reply = real.train(msg, context)
    if fault == "nan":
        state = decode(reply.content["arrays"])
        state = {{k: torch.full_like(v, float("nan")) for k, v in state.items()}}
        reply.content["arrays"] = encode(state)
    return reply
"""


@pytest.fixture(scope="module")
def base_overrides(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "data.jsonl"
    data.write_text("".join(
        json.dumps({"instruction": f"Return x times {i}.", "input": "",
                    "output": f"def f(x):\n    return x * {i}\n"}) + "\n"
        for i in range(120)
    ))  # fmt: skip
    return {
        "num-server-rounds": ROUNDS,
        "model.name": str(tiny_model_dir),
        "model.quantization": 0,
        "model.gradient-checkpointing": False,
        "static.dataset.name": str(data),
        "train.seq-length": 64,
        "train.training-arguments.per-device-train-batch-size": 2,
        "train.training-arguments.max-steps": 2,
        "train.training-arguments.optim": "adamw_torch",
        "train.training-arguments.bf16": False,
        "train.save-every-round": 2,
        "results.resume": True,
        "results.run-name": "run",
    }


def _launch(work: Path, overrides: dict, app: Path = ROOT) -> subprocess.Popen:
    config = work / "run.toml"
    config.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in overrides.items()))
    # Output goes to a file: a pipe nobody reads while we wait would fill and stall the run.
    log = open(work / "run.log", "a")  # noqa: SIM115 (closed in _output)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedcoder.cli", "run", "--app", str(app), "--config",
         str(config), "--flwr-home", str(work / "flwr-home"), "--client-cpus", "1"],
        cwd=work, stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    proc.log = log
    return proc


def _output(proc: subprocess.Popen) -> str:
    proc.log.close()
    return Path(proc.log.name).read_text()


def _finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    proc.wait(timeout=timeout)
    out = _output(proc)
    assert proc.returncode == 0, out[-4000:]
    return out


def _crash(proc: subprocess.Popen, flwr_home: Path) -> None:
    """SIGKILL the launcher and every process of its run (they share its FLWR_HOME)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.log.close()
    for p in processes_with_home(flwr_home):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def _state_round(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "state" / "state.json").read_text())["round"]
    except (OSError, ValueError):
        return 0


def _wait_for_round(run_dir: Path, server_round: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while _state_round(run_dir) < server_round:
        assert proc.poll() is None, _output(proc)[-3000:]
        assert time.monotonic() < deadline, _output(proc)[-3000:]
        time.sleep(0.05)


_VARYING = ("node_id", "worker-pid", "model-load-seconds", "train_seconds", "handler-seconds")
_ATTEMPT_TIMES = ("exchange_seconds", "aggregate_seconds")


def _comparable(metrics: dict) -> list[dict]:
    """Each round without what legitimately differs between runs (times, pids, node ids)."""
    rounds = []
    for r in metrics["rounds"]:
        kept = {k: v for k, v in r.items() if k not in ("seconds", "clients", "dropped")}
        kept["clients"] = [{k: v for k, v in c.items() if k not in _VARYING} for c in r["clients"]]
        kept["attempts"] = [
            {k: v for k, v in a.items() if k not in _ATTEMPT_TIMES} for a in r["attempts"]
        ]
        rounds.append(kept)
    return rounds


def _final(run_dir: Path) -> tuple[dict, list[dict]]:
    adapter = load_file(str(run_dir / f"peft_{ROUNDS}" / "adapter_model.safetensors"))
    return adapter, _comparable(json.loads((run_dir / "metrics.json").read_text()))


def test_sigkilled_server_resumes_to_the_identical_result(base_overrides, tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    clean.mkdir()
    crashed.mkdir()
    _finish(_launch(clean, base_overrides))
    expected_adapter, expected_rounds = _final(clean / "results" / "run")

    run_dir = crashed / "results" / "run"
    # Kill 1: right after round 1 is persisted. Kill 2: in the middle of round 3.
    proc = _launch(crashed, base_overrides)
    _wait_for_round(run_dir, 1, proc)
    _crash(proc, crashed / "flwr-home")
    proc = _launch(crashed, base_overrides)
    _wait_for_round(run_dir, 2, proc)  # round 3 starts at once
    _crash(proc, crashed / "flwr-home")
    killed_at = _state_round(run_dir)
    assert 2 <= killed_at < ROUNDS
    out = _finish(_launch(crashed, base_overrides))
    assert f"resuming {run_dir} after round {killed_at}" in out

    adapter, rounds = _final(run_dir)
    assert adapter.keys() == expected_adapter.keys()
    assert all(torch.equal(adapter[k], expected_adapter[k]) for k in adapter)
    assert rounds == expected_rounds  # losses, lrs, clients sampled, bytes (per round, total)


def test_sigterm_stops_every_process_of_the_run(base_overrides, tmp_path):
    proc = _launch(tmp_path, base_overrides)
    _wait_for_round(tmp_path / "results" / "run", 1, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    _output(proc)
    assert proc.returncode != 0
    assert [p.pid for p in processes_with_home(tmp_path / "flwr-home")] == []


def test_resume_with_another_config_is_refused(base_overrides, tmp_path):
    _finish(_launch(tmp_path, {**base_overrides, "num-server-rounds": 1}))
    metrics = (tmp_path / "results" / "run" / "metrics.json").read_bytes()
    proc = _launch(tmp_path, {**base_overrides, "num-server-rounds": 1, "train.seed": 7})
    proc.wait(timeout=600)
    out = _output(proc)
    assert proc.returncode != 0
    assert "different config" in out
    assert (tmp_path / "results" / "run" / "metrics.json").read_bytes() == metrics


def test_faulty_clients_do_not_stop_the_run(base_overrides, tmp_path):
    # Six of ten partitions misbehave; with 2 clients per round, some rounds get
    # one good reply (aggregated) and some none (retried with a fresh sample).
    faults = {0: "raise", 1: "hang", 2: "raise", 3: "nan", 4: "raise", 5: "nan"}
    timeout_s = 20.0
    app = tmp_path / "app"
    app.mkdir()
    (app / "faulty_client.py").write_text(
        FAULTY_CLIENT.format(faults=faults, hang_s=timeout_s + 10)
    )
    (app / "pyproject.toml").write_text(
        (ROOT / "pyproject.toml")
        .read_text()
        .replace('clientapp = "fedcoder.client_app:app"', 'clientapp = "faulty_client:app"')
    )
    overrides = {
        **base_overrides,
        "strategy.round-timeout": timeout_s,
        "strategy.max-round-retries": 6,
        "train.seed": 3,
    }
    _finish(_launch(tmp_path, overrides, app=app), timeout=900)
    metrics = json.loads((tmp_path / "results" / "run" / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))

    def partition(identity: str) -> int:
        return int(identity.rsplit("partition ", 1)[1].split("/")[0])

    seen = {"raise": 0, "hang": 0, "nan": 0}
    for r in rounds:
        assert r["clients"], r
        assert r["retries"] == len(r["attempts"]) - 1
        assert [a["aggregated"] for a in r["attempts"]] == [False] * r["retries"] + [True]
        for attempt in r["attempts"]:
            reasons = {partition(d["client"]): d["reason"] for d in attempt["dropped"]}
            missing = {partition(c) for c in attempt["no_reply"]}
            for p in map(partition, attempt["sampled"]):
                fault = faults.get(p)
                if fault is not None:
                    seen[fault] += 1
                if fault == "hang":
                    assert p in missing
                elif fault == "nan":
                    assert "non-finite" in reasons[p]
                elif fault == "raise":
                    assert "client error" in reasons[p]
        trained = {partition(c["client"]) for c in r["clients"]}
        assert not trained & set(faults)
    assert any(r["retries"] > 0 for r in rounds), "no round needed a retry: pick another seed"
    assert any(len(r["attempts"][-1]["sampled"]) > len(r["clients"]) for r in rounds)
    assert all(count > 0 for count in seen.values()), seen
    final = load_file(
        str(tmp_path / "results" / "run" / f"peft_{ROUNDS}" / "adapter_model.safetensors")
    )
    assert all(torch.isfinite(t).all() for t in final.values())
    assert os.path.isdir(tmp_path / "results" / "run" / "state")

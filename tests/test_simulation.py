"""End to end: a real Flower simulation (`fedcoder run`), 10 virtual clients, tiny Phi3 model."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from conftest import tiny_run_overrides, write_addition_data, write_run_config
from peft import PeftModel

from fedcoder.communication import encode, payload_bytes
from fedcoder.config import RunConfig
from fedcoder.model import adapter_state, initial_adapter, load_base_model
from fedcoder.processes import processes_with_home, staged_app
from fedcoder.simulation import run_simulation
from fedcoder.training import cosine_lr

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
ROUNDS = 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("sim")
    data = write_addition_data(work / "data.jsonl", rows=120)
    overrides = tiny_run_overrides(
        tiny_model_dir, data, work / "results",
        **{"num-server-rounds": ROUNDS, "train.save-every-round": 2, "results.run-name": "e2e"},
    )  # fmt: skip
    if (SHARED_DATA / "mbpp.jsonl").exists():
        # Executed-code validation of the global adapter in rounds 2 and 3 (the last).
        overrides |= {
            "validation.every-rounds": 2,
            "validation.num-problems": 2,
            "validation.max-new-tokens": 4,
            "validation.data-dir": str(SHARED_DATA),
        }
    config_file = write_run_config(work / "run.toml", overrides)
    result = subprocess.run(
        [sys.executable, "-m", "fedcoder.cli", "run", "--app", str(ROOT),
         "--config", str(config_file), "--flwr-home", str(work / "flwr-home")],
        capture_output=True, text=True, timeout=600, cwd=work,
        env={**os.environ, "RAY_DEDUP_LOGS": "0"},
    )  # fmt: skip
    # Everything the run started inherits its private FLWR_HOME.
    leftovers = {p.pid for p in processes_with_home(work / "flwr-home")}
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = work / "results" / "e2e"
    return {
        "dir": run_dir,
        "config": RunConfig.from_flat(overrides),
        "leftovers": leftovers,
        "flwr_home": work / "flwr-home",
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
    }


def test_the_server_app_tells_the_launcher_it_completed(finished_run):
    # So the launcher need not ask the SuperLink how the run ended (`flwr ls`).
    completed = finished_run["flwr_home"] / "run-completed"
    assert Path(completed.read_text().strip()) == finished_run["dir"]


def test_no_process_is_left_behind(finished_run):
    alive = [pid for pid in finished_run["leftovers"] if psutil.pid_exists(pid)]
    assert alive == []


def test_every_round_is_recorded_with_the_scheduled_lr(finished_run):
    rounds = finished_run["metrics"]["rounds"]
    train = finished_run["config"].train
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:
        expected = cosine_lr(r["round"], ROUNDS, train.learning_rate_max, train.learning_rate_min)
        assert r["lr"] == pytest.approx(expected, rel=1e-12)
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        assert len(r["clients"]) == 2 and r["dropped"] == []
        assert {c["partition-id"] for c in r["clients"]} <= set(range(10))
        assert r["examples"] == sum(c["examples"] for c in r["clients"]) == 2 * 2 * 2


def test_round_times_account_for_the_clients_and_the_exchange(finished_run):
    # Where a round's time goes: the clients' handlers run inside the exchange, and the
    # exchange and the averaging inside the round.
    for r in finished_run["metrics"]["rounds"]:
        (attempt,) = r["attempts"]
        handlers = [c["handler-seconds"] for c in r["clients"]]
        assert all(c["handler-seconds"] >= c["train_seconds"] > 0 for c in r["clients"])
        assert attempt["exchange_seconds"] >= max(handlers)
        assert attempt["aggregate_seconds"] > 0
        assert attempt["exchange_seconds"] + attempt["aggregate_seconds"] <= r["seconds"]


def test_bytes_equal_the_payload_sizes(finished_run):
    config = finished_run["config"]
    one_copy = payload_bytes(encode(initial_adapter(config.model, seed=0), "float32"))
    cumulative = 0
    for r in finished_run["metrics"]["rounds"]:
        assert r["bytes_down"] == r["bytes_up"] == 2 * one_copy
        cumulative += 4 * one_copy
        assert r["bytes_cumulative"] == cumulative
        assert r["mb_cumulative"] == pytest.approx(cumulative / 2**20)


def test_base_model_stays_resident_in_each_worker(finished_run):
    seen: set[int] = set()
    reused = 0
    for r in finished_run["metrics"]["rounds"]:
        for client in r["clients"]:
            if client["worker-pid"] in seen:
                assert client["model-load-seconds"] == 0.0
                reused += 1
            seen.add(client["worker-pid"])
    assert reused >= 2


def test_checkpoints_load_with_peft_and_outputs_exist(finished_run, tiny_model_dir):
    run_dir = finished_run["dir"]
    assert sorted(p.name for p in run_dir.glob("peft_[0-9]*")) == ["peft_2", "peft_3"]
    assert (run_dir / "train_loss.png").stat().st_size > 1000
    assert (
        json.loads((run_dir / "config.json").read_text())["fingerprint"]
        == finished_run["metrics"]["fingerprint"]
    )
    base, _ = load_base_model(str(tiny_model_dir), dtype=torch.float32, device="cpu")
    model = PeftModel.from_pretrained(base, str(run_dir / "peft_3"))
    state = adapter_state(model)
    initial = initial_adapter(finished_run["config"].model, seed=0)
    assert state.keys() == initial.keys()
    assert any(not torch.equal(state[k], initial[k]) for k in state)  # training moved it


def test_validation_scores_rounds_and_marks_the_best_checkpoint(finished_run):
    if "validation" not in finished_run["metrics"]["rounds"][-1]:
        pytest.skip(f"shared data absent: {SHARED_DATA / 'mbpp.jsonl'} (MBPP validation split)")
    rounds = finished_run["metrics"]["rounds"]
    validated = [r for r in rounds if "validation" in r]
    assert [r["round"] for r in validated] == [2, 3]
    for r in validated:
        assert r["validation"]["n_problems"] == 2 and 0 <= r["validation"]["pass@1"] <= 1
        assert r["checkpoint"] == f"peft_{r['round']}"
    best = max(validated, key=lambda r: r["validation"]["pass@1"])
    assert finished_run["metrics"]["best"]["round"] == best["round"]
    link = finished_run["dir"] / "peft_best"
    assert link.resolve() == (finished_run["dir"] / best["checkpoint"]).resolve()


def test_the_staged_app_builds_the_same_fab_without_the_ignored_files(tmp_path):
    # `fedcoder run` hands Flower a staged copy of the app without what .gitignore
    # ignores (a .venv inside the app costs Flower seconds to walk); Flower must build
    # the very same FAB from it.
    from flwr.cli.build import build_fab_from_disk

    app = tmp_path / "app"
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(".venv", ".git", "results"))
    (app / ".venv" / "lib").mkdir(parents=True)
    (app / ".venv" / "lib" / "big.py").write_text("x = 1\n")
    (app / "results" / "run").mkdir(parents=True)
    (app / "results" / "run" / "metrics.json").write_text("{}")
    (app / "fedcoder" / "__pycache__").mkdir(exist_ok=True)
    (app / "fedcoder" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (app / "link.py").symlink_to(app / "README.md")
    with staged_app(app) as staged:
        staged_files = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
        fab_staged = build_fab_from_disk(staged)
    assert fab_staged == build_fab_from_disk(app)
    assert {"pyproject.toml", "fedcoder/client_app.py", "README.md"} <= staged_files
    assert not any(
        f.startswith((".venv/", "results/")) or "__pycache__" in f or f == "link.py"
        for f in staged_files
    )
    assert not staged.exists()


def test_a_server_app_that_fails_fails_the_launch(tmp_path, capfd):
    # `flwr run --stream` exits 0 whatever happened; the launcher takes a run as completed
    # only when the ServerApp said so (the file it creates at the end), else asks Flower.
    app = tmp_path / "app"
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(".*", "results", "docs", "tests"))
    server = app / "fedcoder" / "server_app.py"
    first_line = "    config = RunConfig.from_flat(context.run_config)\n"
    assert first_line in server.read_text()
    server.write_text(server.read_text().replace(first_line, "    raise RuntimeError('x')\n"))
    code = run_simulation(app, num_supernodes=2, client_gpus=0, flwr_home=tmp_path / "home")
    assert code == 1
    assert "the run ended with status 'finished:failed'" in capfd.readouterr().err
    assert not (tmp_path / "home" / "run-completed").exists()

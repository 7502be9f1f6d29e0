"""Deployment Engine on loopback: a SuperLink and SuperNodes with TLS and node authentication.

One deployment (`fedcoder.deployment.LocalDeployment`, as `fedcoder deploy`
starts it), tiny Phi3 model, two runs on it:
1. 2 SuperNodes, 2 rounds, one training on a partition of the run's dataset,
   one on its own file; before it, a SuperNode whose key was never registered
   tries to join;
2. a third SuperNode joins, 2 of 3 train per round, and the first SuperNode to
   receive a train message is SIGKILLed while it trains.
"""

import json
import math
import ssl
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from conftest import tiny_run_overrides, write_run_config
from peft import PeftModel

from fedcoder.config import RunConfig
from fedcoder.deployment import LocalDeployment, SuperNode
from fedcoder.model import adapter_state, initial_adapter, load_base_model

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _write_data(path: Path, operator: str) -> Path:
    path.write_text("".join(
        json.dumps({"instruction": f"Return x {operator} {i}.", "input": "",
                    "output": f"def f(x):\n    return x {operator} {i}\n"}) + "\n"
        for i in range(120)
    ))  # fmt: skip
    return path


def _run_config(work: Path, tiny_model_dir: Path, name: str, **extra) -> tuple[Path, dict]:
    data = _write_data(work / "data.jsonl", "+")
    overrides = tiny_run_overrides(
        tiny_model_dir, data, work / "results",
        **{"num-server-rounds": 2, "train.save-every-round": 1, "results.run-name": name},
        **extra,
    )  # fmt: skip
    path = write_run_config(work / f"{name}.toml", overrides)
    return path, overrides


@pytest.fixture(scope="module")
def deployment_runs(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    secure_config, overrides = _run_config(work, tiny_model_dir, "secure")
    crash_config, _ = _run_config(
        work, tiny_model_dir, "crash",
        **{
            "strategy.fraction-train": 0.5,  # 2 of 3 per round
            "strategy.min-train-replies": 1,
            "strategy.round-timeout": 30.0,
            # Long enough that the killed node cannot have replied already.
            "train.training-arguments.max-steps": 4,
        },
    )  # fmt: skip
    out = {"config": RunConfig.from_flat(overrides)}
    with LocalDeployment(work / "deployment") as deployment:
        deployment.start()
        own_data = _write_data(work / "own-data.jsonl", "*")
        nodes = [
            deployment.add_supernode("partition-id=0 num-partitions=2"),
            deployment.add_supernode(f"dataset-path={json.dumps(str(own_data))}"),
        ]
        deployment.wait_for_supernodes()
        ca = ssl.create_default_context(cafile=str(deployment.tls.ca_certificate))
        url = f"{deployment.address}/health"
        out["tls"] = {
            "https with the CA": httpx.get(f"https://{url}", verify=ca).is_success,
            "plain http refused": _fails(lambda: httpx.get(f"http://{url}")),
            "https with system CAs refused": _fails(lambda: httpx.get(f"https://{url}")),
        }
        intruder = deployment.add_supernode("partition-id=0 num-partitions=2", register=False)
        out["intruder_code"] = intruder.process.wait(timeout=120)
        out["online_after_intruder"] = deployment.online_node_ids()
        out["registered"] = {node.node_id for node in nodes}
        out["data_of"] = {nodes[0].node_id: "data.jsonl", nodes[1].node_id: "own-data.jsonl"}
        out["secure_code"] = deployment.run(ROOT, [str(secure_config)], timeout_s=400)

        newcomer = deployment.add_supernode("partition-id=2 num-partitions=3")
        deployment.wait_for_supernodes([*nodes, newcomer])
        killed: list[SuperNode] = []
        offsets = {node.name: node.log.stat().st_size for node in deployment.supernodes}
        killer = threading.Thread(target=_kill_first_trainer, args=(deployment, offsets, killed))
        killer.start()
        out["crash_code"] = deployment.run(ROOT, [str(crash_config)], timeout_s=400)
        killer.join()
        out["killed"] = killed[0]
        out["started"] = deployment.processes
    out["superlink_log"] = (deployment.logs / "superlink.log").read_text()
    for name in ("secure", "crash"):
        out[name] = work / "results" / name
    return out


def _fails(request) -> bool:
    try:
        request()
    except httpx.HTTPError:
        return True
    return False


def _kill_first_trainer(
    deployment: LocalDeployment, offsets: dict[str, int], killed: list[SuperNode]
) -> None:
    """SIGKILL the first SuperNode that receives a train message (after `offsets`)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for node in deployment.supernodes:
            with node.log.open("rb") as log:
                log.seek(offsets.get(node.name, 0))
                if b"Receiving: train message" in log.read():
                    deployment.kill_supernode(node)
                    killed.append(node)
                    return
        time.sleep(0.1)


def _rounds(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["rounds"]


def _load_checkpoint(path: Path, tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    base, _ = load_base_model(str(tiny_model_dir), dtype=torch.float32, device="cpu")
    state = adapter_state(PeftModel.from_pretrained(base, str(path)))
    assert all(torch.isfinite(t).all() for t in state.values())
    return state


def test_superlink_speaks_tls_only(deployment_runs):
    assert all(deployment_runs["tls"].values()), deployment_runs["tls"]


def test_run_completes_on_the_registered_supernodes(deployment_runs):
    assert deployment_runs["secure_code"] == 0
    rounds = _rounds(deployment_runs["secure"])
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert {c["node_id"] for c in r["clients"]} == deployment_runs["registered"]
        assert math.isfinite(r["train_loss"])


def test_each_supernode_trains_on_the_data_its_node_config_names(deployment_runs):
    for client in _rounds(deployment_runs["secure"])[0]["clients"]:
        dataset = client["client"].split(" partition ")[0]
        assert Path(dataset).name == deployment_runs["data_of"][client["node_id"]]


def test_unregistered_supernode_is_refused(deployment_runs):
    assert deployment_runs["intruder_code"] != 0
    assert "No SuperNode found with the given public key" in deployment_runs["superlink_log"]
    assert deployment_runs["online_after_intruder"] == deployment_runs["registered"]


def test_each_supernode_keeps_its_base_model_loaded(deployment_runs):
    first, second = _rounds(deployment_runs["secure"])
    pid_of = {c["node_id"]: c["worker-pid"] for c in first["clients"]}
    for client in second["clients"]:
        assert client["worker-pid"] == pid_of[client["node_id"]]
        assert client["model-load-seconds"] == 0.0


def test_final_checkpoint_loads_with_peft(deployment_runs, tiny_model_dir):
    state = _load_checkpoint(deployment_runs["secure"] / "peft_2", tiny_model_dir)
    initial = initial_adapter(deployment_runs["config"].model, seed=0)
    assert state.keys() == initial.keys()
    assert any(not torch.equal(state[k], initial[k]) for k in state)  # training moved it


def test_run_survives_a_supernode_killed_mid_round(deployment_runs, tiny_model_dir):
    assert deployment_runs["crash_code"] == 0
    killed = deployment_runs["killed"].node_id
    rounds = _rounds(deployment_runs["crash"])
    assert [r["round"] for r in rounds] == [1, 2]
    # The killed node was sampled and never answered; the round went on without it.
    first = rounds[0]["attempts"][-1]
    assert len(first["sampled"]) == 2 and len(first["no_reply"]) == 1
    assert len(rounds[0]["clients"]) == 1
    assert all(c["node_id"] != killed for r in rounds for c in r["clients"])
    # Once the SuperLink knows the node is gone it answers for it with an error; that
    # failure is recorded against the node that was asked, not against the SuperLink.
    attempts = [attempt for r in rounds for attempt in r["attempts"]]
    assert all(d["client"] in a["sampled"] for a in attempts for d in a["dropped"])
    assert all(math.isfinite(r["train_loss"]) for r in rounds)
    _load_checkpoint(deployment_runs["crash"] / "peft_2", tiny_model_dir)


def test_no_process_is_left_behind(deployment_runs):
    started = deployment_runs["started"]
    # SuperLink, its SuperExec, 4 SuperNodes, 3 resident workers, and Flower's children.
    assert len(started) >= 9
    assert [p.pid for p in started if _running(p)] == []


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

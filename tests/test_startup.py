"""Start-up: the apps import quickly, the server asks the nodes first, and a worker that
keeps its model loads it while it answers, so client and server start-up overlap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_run_overrides
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedcoder import client_app, model
from fedcoder.aggregation import AdapterFedAvg
from fedcoder.config import RunConfig
from fedcoder.identities import IDENTITY_KEY, NodeIdentities

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "datasets", "flwr_datasets")


def test_the_apps_import_without_the_ml_stack():
    # The Simulation Engine imports the ClientApp before it starts Ray, and a worker
    # imports it on its first message: anything heavy here delays the whole start.
    code = (
        "import sys, fedcoder.client_app, fedcoder.server_app; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


class AnsweringGrid:
    """Nodes that answer the identity query once their answers are released."""

    def __init__(self, nodes: list[int], silent: frozenset[int] = frozenset()) -> None:
        self.nodes, self.silent = nodes, silent
        self.asked: list[int] = []
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            assert message.metadata.message_type == MessageType.QUERY
            node = message.metadata.dst_node_id
            self.asked.append(node)
            message_id = f"q{len(self.asked)}"
            ids.append(message_id)
            if node in self.silent:
                continue
            identity = ConfigRecord({IDENTITY_KEY: f"partition {node}"})
            reply = Message(RecordDict({"identity": identity}), reply_to=message)
            reply.metadata.__dict__["_reply_to_message_id"] = message_id
            self.replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def test_nodes_asked_early_are_not_asked_again_when_sampling():
    grid = AnsweringGrid([5, 6, 7])
    identities = NodeIdentities()
    identities.ask(grid, grid.get_node_ids())  # the ServerApp, before its imports
    identities.ask(grid, grid.get_node_ids())  # asking again while answers are out: no-op
    assert grid.asked == [5, 6, 7]
    strategy = AdapterFedAvg(fraction_train=0.5, min_train_nodes=2, transport_dtype="float32",
                             max_examples=10, seed=0, identities=identities)  # fmt: skip
    strategy.sample(grid)
    strategy.sample(grid)
    assert grid.asked == [5, 6, 7]
    assert [strategy.identity(n) for n in (5, 6, 7)] == [
        "partition 5",
        "partition 6",
        "partition 7",
    ]


def test_a_node_that_did_not_answer_is_asked_again():
    grid = AnsweringGrid([1, 2], silent=frozenset({2}))
    identities = NodeIdentities()
    identities.ask(grid, grid.get_node_ids())
    identities.collect(grid, timeout=0.3)
    assert identities.name(1) == "partition 1" and identities.name(2) == "node 2"
    grid.silent = frozenset()
    identities.ask(grid, grid.get_node_ids())
    identities.collect(grid, timeout=5)
    assert grid.asked == [1, 2, 2] and identities.name(2) == "partition 2"


def _context(config: dict) -> Context:
    return Context(run_id=1, node_id=3, node_config={"partition-id": 0, "num-partitions": 2},
                   state=RecordDict(), run_config=config)  # fmt: skip


def _query() -> Message:
    message = Message(RecordDict(), dst_node_id=3, message_type=MessageType.QUERY)
    message.metadata.__dict__["_message_id"] = "query-1"
    return message


@pytest.fixture()
def run_config(tiny_model_dir, tmp_path) -> dict:
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "Add.", "input": "", "output": "def add(a, b): ..."}\n')
    return tiny_run_overrides(tiny_model_dir, data, tmp_path / "results")


@pytest.fixture()
def fresh_worker(monkeypatch):
    """A worker process that has loaded nothing yet."""
    monkeypatch.setattr(model, "_RESIDENT", {})
    monkeypatch.setattr(client_app, "_loaders", {})


def test_a_resident_worker_loads_its_model_when_asked_its_identity(
    run_config, fresh_worker, monkeypatch
):
    monkeypatch.setenv(client_app.RESIDENT_WORKER_ENV, "1")
    reply = client_app.identify(_query(), _context(run_config))
    assert reply.content["identity"][IDENTITY_KEY].endswith("partition 00000/2")
    [loader] = client_app._loaders.values()
    loader.join(timeout=120)
    assert not loader.is_alive()
    config = RunConfig.from_flat(run_config)
    _, _, seconds = model.resident_model(
        config.model, bf16=config.train.bf16, seed=config.train.seed
    )
    assert seconds == 0.0  # training finds it loaded
    client_app.identify(_query(), _context(run_config))  # a second query loads nothing more
    assert list(client_app._loaders.values()) == [loader]


def test_a_one_message_process_does_not_load_ahead(run_config, fresh_worker, monkeypatch):
    # flwr-clientapp exits after one message: a model loaded for later would be wasted.
    monkeypatch.delenv(client_app.RESIDENT_WORKER_ENV, raising=False)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    client_app.identify(_query(), _context(run_config))
    assert client_app._loaders == {} and model._RESIDENT == {}
    assert os.environ.get(client_app.RESIDENT_WORKER_ENV) is None

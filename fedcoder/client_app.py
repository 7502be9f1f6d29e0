"""fedcoder ClientApp: Flower glue around `fedcoder.training`.

A client receives the global adapter, trains it on its own data for one round
and replies with the new adapter and what it trained on.

Importing this module loads Flower only; torch, transformers and PEFT are
imported by the first message that needs them. The Simulation Engine imports
the ClientApp before it starts Ray, and each worker imports it on its first
message, the server's data-identity query: both are then quick, and a worker
that keeps its model loads it in the background while it answers.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcoder.config import ModelSettings, RunConfig
from fedcoder.identities import IDENTITY_KEY

log = logging.getLogger(__name__)

# Set to "1" by a process that runs many ClientApp messages (`fedcoder
# clientapp-worker` does), so that a model loaded early is used later.
RESIDENT_WORKER_ENV = "FEDCODER_RESIDENT_WORKER"

app = ClientApp()


def _data_spec(context: Context, default_dataset: str) -> tuple[str, int, int]:
    """(dataset, partition id, number of partitions) this node trains on.

    A SuperNode may name its own data (deployment); in simulation every node
    gets a partition of the run's dataset.
    """
    node = context.node_config
    return (
        str(node.get("dataset-path", default_dataset)),
        int(node.get("partition-id", 0)),
        int(node.get("num-partitions", 1)),
    )


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server what data this node holds, so it samples by data, not by node id."""
    config = RunConfig.from_flat(context.run_config)
    dataset, partition_id, num_partitions = _data_spec(context, config.data.name)
    if serves_many_messages():
        start_loading(config)
    identity = f"{dataset} partition {partition_id:05d}/{num_partitions}"
    return Message(RecordDict({"identity": ConfigRecord({IDENTITY_KEY: identity})}), reply_to=msg)


def serves_many_messages() -> bool:
    """Whether this process will run later messages too, so a model loaded now is used.

    True in a Simulation Engine worker (a Ray actor) and in `fedcoder
    clientapp-worker`; false in `flwr-clientapp`, which exits after one message.
    """
    if os.environ.get(RESIDENT_WORKER_ENV) == "1":
        return True
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


_loaders: dict[tuple[ModelSettings, bool, int], threading.Thread] = {}


def start_loading(config: RunConfig) -> None:
    """Load the resident model in a background thread, once per process and model.

    A failure is only logged: the training message loads the model again and
    reports the error as its own.
    """
    key = _model_key(config)
    if key in _loaders:
        return

    def load() -> None:
        try:
            from fedcoder.model import resident_model

            resident_model(config.model, bf16=config.train.bf16, seed=config.train.seed)
        except Exception as err:  # noqa: BLE001 - reported again by the training message
            log.warning("loading the base model ahead of training failed: %s", err)

    _loaders[key] = threading.Thread(target=load, name="fedcoder-model-load", daemon=True)
    _loaders[key].start()


def _wait_for_loading(config: RunConfig) -> float:
    """Seconds spent waiting for this model's background load, if one is still running.

    Training waits before it imports anything itself, so that no two threads import
    the ML stack at the same time.
    """
    loader = _loaders.get(_model_key(config))
    if loader is None or not loader.is_alive():
        return 0.0
    started = time.perf_counter()
    loader.join()
    return time.perf_counter() - started


def _model_key(config: RunConfig) -> tuple[ModelSettings, bool, int]:
    return config.model, config.train.bf16, config.train.seed


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    config = RunConfig.from_flat(context.run_config)
    waited = _wait_for_loading(config)

    import torch

    from fedcoder.communication import decode, encode
    from fedcoder.data import load_partition
    from fedcoder.model import adapter_state, physical_gpu, resident_model, set_adapter_state
    from fedcoder.training import train_round

    server_round = int(msg.content["config"]["server-round"])
    model, tokenizer, load_seconds = resident_model(
        config.model, bf16=config.train.bf16, seed=config.train.seed
    )
    set_adapter_state(model, decode(msg.content["arrays"], config.train.transport_dtype))

    dataset, partition_id, num_partitions = _data_spec(context, config.data.name)
    records = load_partition(
        dataset,
        partition_id=partition_id,
        num_partitions=num_partitions,
        seed=config.train.seed,
        holdout_fraction=config.data.holdout_fraction,
    )
    # Dropout masks depend on (seed, round, partition) only, so runs are repeatable.
    torch.manual_seed(config.train.seed * 100_003 + server_round * 1_009 + partition_id)
    report = train_round(
        model,
        tokenizer,
        records,
        config.train,
        lr=float(msg.content["config"]["lr"]),
        server_round=server_round,
    )
    metrics = {
        **report.as_metrics(),
        "num-examples": report.examples,
        "partition-id": partition_id,
        # Time this message spent on the model: waiting for the background load, or loading.
        "model-load-seconds": waited + load_seconds,
        "worker-pid": os.getpid(),  # shows which worker kept the model resident
        "gpu": physical_gpu(),  # which of the host's GPUs trained it (-1: CPU)
    }
    arrays = encode(adapter_state(model), config.train.transport_dtype)
    # All of this handler, the adapter's decoding and encoding included: the round's
    # exchange_seconds less this is what Flower spent delivering the two messages.
    metrics["handler-seconds"] = time.perf_counter() - started
    return Message(
        content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg
    )

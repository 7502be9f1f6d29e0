"""fedcoder ClientApp: Flower glue around `fedcoder.training`.

A client receives the global adapter, trains it on its own data for one round
and replies with the new adapter and what it trained on.
"""

from __future__ import annotations

import os

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcoder.aggregation import IDENTITY_KEY
from fedcoder.communication import decode, encode
from fedcoder.config import RunConfig
from fedcoder.data import load_partition
from fedcoder.model import adapter_state, physical_gpu, resident_model, set_adapter_state
from fedcoder.training import train_round

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
    dataset, partition_id, num_partitions = _data_spec(
        context, RunConfig.from_flat(context.run_config).data.name
    )
    identity = f"{dataset} partition {partition_id:05d}/{num_partitions}"
    return Message(RecordDict({"identity": ConfigRecord({IDENTITY_KEY: identity})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = RunConfig.from_flat(context.run_config)
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
        "model-load-seconds": load_seconds,
        "worker-pid": os.getpid(),  # shows which worker kept the model resident
        "gpu": physical_gpu(),  # which of the host's GPUs trained it (-1: CPU)
    }
    arrays = encode(adapter_state(model), config.train.transport_dtype)
    return Message(
        content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg
    )

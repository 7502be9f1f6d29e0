"""The baseline's ClientApp: every train message loads the base model afresh and trains it
with a transformers Trainer (bench/train_throughput.py `reference_client_round`)."""

from __future__ import annotations

import train_throughput as recipe
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowertune_reference.task import experiment

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    exp = experiment(context)
    partition = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    state = msg.content["arrays"].to_torch_state_dict()
    client, new_state = recipe.reference_client_round(exp, state, server_round, partition)
    metrics = MetricRecord(
        {
            "train_loss": client["train_loss"],
            "num-examples": len(exp.partitions[partition]),  # as the baseline reports it
            "load-seconds": client["load_seconds"],
            "train-seconds": client["train_seconds"],
        }
    )
    return Message(RecordDict({"arrays": ArrayRecord(new_state), "metrics": metrics}), reply_to=msg)

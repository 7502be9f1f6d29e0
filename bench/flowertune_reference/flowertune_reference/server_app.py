"""The baseline's ServerApp: a whole model loaded for the initial adapter, Flower's FedAvg,
and a model loaded again to save each checkpoint (every `save-every-round` rounds and the
last). With `out` set, writes each round's loss and times there as JSON."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import train_throughput as recipe
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedcoder.config import COMPLETED_FILE_ENV
from flowertune_reference.task import experiment

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    exp = experiment(context)
    save_every = int(context.run_config["save-every-round"])
    model = recipe.reference_model(exp)
    initial = ArrayRecord(recipe.cpu_state(model))
    del model
    recipe.free_memory()
    ended = [time.perf_counter()]  # when round 0 (the initial adapter) and each round ended

    def save_checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        # Flower calls this before round 1 and after every round.
        if server_round and (server_round % save_every == 0 or server_round == exp.rounds):
            recipe.reference_server_work(exp, arrays.to_torch_state_dict())
        if server_round:
            ended.append(time.perf_counter())
        return MetricRecord()

    strategy = FedAvg(
        fraction_train=float(context.run_config["fraction-train"]), fraction_evaluate=0.0
    )
    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=exp.rounds, evaluate_fn=save_checkpoint
    )
    if context.run_config.get("out"):
        rounds = [
            {"round": r, "seconds": ended[r] - ended[r - 1], **dict(metrics)}
            for r, metrics in sorted(result.train_metrics_clientapp.items())
        ]
        summary = {"initial_adapter_seconds": ended[0] - started, "rounds": rounds}
        Path(str(context.run_config["out"])).write_text(json.dumps(summary, indent=1) + "\n")
    # The same end signal as fedcoder's ServerApp, so both runs are timed alike by the
    # launcher (fedcoder.simulation): neither waits for Flower's own shutdown.
    if os.environ.get(COMPLETED_FILE_ENV):
        Path(os.environ[COMPLETED_FILE_ENV]).write_text("reference\n")

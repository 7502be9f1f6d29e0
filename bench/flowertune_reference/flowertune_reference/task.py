"""The experiment both apps share: bench/train_throughput.py's, built from the run config."""

from __future__ import annotations

import functools

# bench/ is on PYTHONPATH (RECIPE=reference bench/federated_wall_time.sh).
import train_throughput as recipe
from flwr.app import Context


def experiment(context: Context) -> recipe.Experiment:
    config = context.run_config
    return _experiment(
        str(config["model-path"]),
        str(config["data-path"]),
        int(config["num-server-rounds"]),
        int(config["max-steps"]),
        int(config["batch-size"]),
    )


# The baseline keeps its partitioned dataset in a module-level cache, and nothing else.
@functools.cache
def _experiment(
    model_path: str, data: str, rounds: int, steps: int, batch_size: int
) -> recipe.Experiment:
    return recipe.make_experiment(
        model_path, data, rounds=rounds, steps=steps, batch_size=batch_size
    )

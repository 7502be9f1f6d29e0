"""fedcoder ServerApp: Flower glue around `fedcoder.federation`.

Everything is validated before the run directory is created, so a bad config
stops the run with one clear line and leaves `results/` untouched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcoder.config import COMPLETED_FILE_ENV, RunConfig
from fedcoder.identities import NodeIdentities

if TYPE_CHECKING:
    import torch

    from fedcoder.results import RunDirectory
    from fedcoder.run_state import RunState

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_flat(context.run_config)
    # Asked before anything heavy is imported: the clients answer, and start loading
    # their base model, while this process imports torch and builds the initial adapter.
    identities = NodeIdentities()
    identities.ask(grid, grid.get_node_ids())

    from fedcoder.data import load_records
    from fedcoder.federation import run_federation
    from fedcoder.model import resolve_model_path

    load_records(config.data.name)  # fails here, naming the file/row/column, if unusable
    run, saved, initial = open_run(config)  # with results.resume: continue after `saved`
    run_federation(
        grid,
        config,
        run,
        initial,
        base_model=resolve_model_path(config.model.name),
        resume_from=saved,
        identities=identities,
    )
    if os.environ.get(COMPLETED_FILE_ENV):
        Path(os.environ[COMPLETED_FILE_ENV]).write_text(f"{run.path}\n")


def open_run(config: RunConfig) -> tuple[RunDirectory, RunState | None, dict[str, torch.Tensor]]:
    """The run directory, its saved state if resumed, and the adapter round 1 starts from.

    Only a run without a saved round builds the initial adapter: it reads DoRA's magnitudes
    from every target weight (6.4 GB for Phi-4-mini). A new run builds it before its
    directory is created, so a model it cannot use leaves results/ as it was.
    """
    from fedcoder.model import initial_adapter
    from fedcoder.results import RunDirectory, run_path

    if config.results.resume and run_path(config).exists():
        run, saved = RunDirectory.open(config)  # creates nothing: the directory is there
        if saved is not None:
            return run, saved, saved.adapter
        return run, None, initial_adapter(config.model, seed=config.train.seed)
    initial = initial_adapter(config.model, seed=config.train.seed)
    run, saved = RunDirectory.open(config)
    return run, saved, initial

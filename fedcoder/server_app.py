"""fedcoder ServerApp: Flower glue around `fedcoder.federation`.

Everything is validated before the run directory is created, so a bad config
stops the run with one clear line and leaves `results/` untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcoder.config import COMPLETED_FILE_ENV, RunConfig
from fedcoder.identities import NodeIdentities

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
    from fedcoder.model import initial_adapter, resolve_model_path
    from fedcoder.results import RunDirectory

    load_records(config.data.name)  # fails here, naming the file/row/column, if unusable
    initial = initial_adapter(config.model, seed=config.train.seed)
    run, saved = RunDirectory.open(config)  # with results.resume: continue after `saved`
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

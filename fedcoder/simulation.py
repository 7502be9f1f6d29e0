"""Run the app in Flower's Simulation Engine and leave no process behind.

`flwr run` on a `:local:` connection starts a detached SuperLink that
outlives the run, and by default builds a fresh environment per run (pulling a
multi-GB CUDA torch). This launcher starts that SuperLink itself, with runtime
dependency installation off and a private FLWR_HOME, streams the run, and then
stops exactly the processes it started (by PID, `fedcoder.processes`).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedcoder.config import COMPLETED_FILE_ENV
from fedcoder.processes import (
    flower_env,
    flower_executable,
    free_port,
    healthy,
    latest_run_status,
    process_tree,
    processes_with_home,
    staged_app,
    stop_processes,
    wait_until,
)


@dataclass
class LocalSuperLink:
    """A simulation SuperLink on loopback, owned by this process."""

    flwr_home: Path
    http_port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    # For the processes it starts, the ServerApp among them.
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            **flower_env(self.flwr_home),
            **self.extra_env,
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
            # Ray starts one idle Python worker per CPU for later tasks, but Flower's
            # ClientApp actors carry a runtime env, so none of those workers can host one:
            # on a 16-core GPU machine that is 16 processes importing Ray, in vain, while
            # the actors, the ServerApp and the model loads start up.
            "RAY_enable_worker_prestart": "0",
            "RAY_prestart_worker_first_driver": "0",
        }

    def start(self, timeout_s: float = 60.0) -> None:
        runtime = self.flwr_home / "local-superlink"
        runtime.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        )
        command = [
            flower_executable("flower-superlink"), "--insecure", "--simulation",
            "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
            "--control-api-address", f"127.0.0.1:{self.control_port}",
            "--host", "127.0.0.1", "--port", str(self.http_port),
            "--database", str(runtime / "state.db"),
            "--log-file", str(runtime / "superlink.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=Path.cwd(),  # relative results.dir resolves against where the user ran us
        )
        try:
            wait_until(
                lambda: healthy(f"http://127.0.0.1:{self.http_port}"),
                self.process,
                what="flower-superlink",
                timeout_s=timeout_s,
                log=runtime / "superlink.log",
            )
        except RuntimeError:
            self.stop()
            raise

    def run_status(self) -> str:
        """Status of the most recent run on this SuperLink, e.g. 'finished:completed'."""
        return latest_run_status(self.env, "local")

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the SuperLink and every process it started, by PID.

        Flower detaches its children (superexec, the simulation, Ray) into
        their own sessions, so a process group does not reach them: take the
        SuperLink's descendant tree first, then terminate all of it.
        """
        if self.process is None:
            return
        tree = process_tree(self.process.pid)
        tree += [p for p in processes_with_home(self.flwr_home) if p not in tree]
        stop_processes(tree, grace_s)
        self.process.wait()


# Flower uploads a run's log every 0.2 s and `flwr run --stream` asks for it every 0.5 s
# (flwr.common.constant): this long after the ServerApp's end, its last lines are printed.
LOG_FLUSH_S = 1.0


def _stream_until_done(
    command: list[str], env: dict[str, str], completed: Path, timeout_s: float | None
) -> int:
    """Run `flwr run --stream` until it exits or the ServerApp says it finished; its exit code.

    After the last round, Flower still stops the workers, shuts Ray down and marks the run
    finished before `flwr run` returns: about 4 s with nothing left to show or save, since
    the ServerApp creates `completed` after the run's last result is written. Then the
    stream gets LOG_FLUSH_S to print the last lines, and the caller stops every process.
    """
    client = subprocess.Popen(command, env=env)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while client.poll() is None:
            if completed.exists():
                try:
                    return client.wait(timeout=LOG_FLUSH_S)
                except subprocess.TimeoutExpired:
                    return 0
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the run did not finish within {timeout_s:.0f} s")
            time.sleep(0.1)
        return client.returncode
    finally:
        if client.poll() is None:
            client.terminate()
            client.wait()


def default_client_gpus() -> float:
    """One GPU per client where CUDA GPUs are visible, else none.

    Ray hides every GPU from a worker that asked for none (it sets
    CUDA_VISIBLE_DEVICES to ""), so a default of 0 on a GPU host would train
    on the CPU without a word. With 1, Ray gives each concurrent client a GPU
    of its own: clients never share one unless a fraction asks for it.
    """
    import torch

    return 1.0 if torch.cuda.device_count() > 0 else 0.0


def run_simulation(
    app_dir: Path,
    *,
    num_supernodes: int = 10,
    client_cpus: int = 1,
    client_gpus: float | None = None,
    run_config: list[str] | None = None,
    flwr_home: Path | None = None,
    timeout_s: float | None = None,
) -> int:
    """Run the app to completion with `flwr run --stream`; return its exit code."""
    if client_gpus is None:
        client_gpus = default_client_gpus()
    home = flwr_home or Path(tempfile.mkdtemp(prefix="fedcoder-flwr-home-"))
    superlink = LocalSuperLink(home)
    federation = (
        f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus} "
        f"client-resources-num-gpus={client_gpus}"
    )
    completed = home / "run-completed"
    completed.unlink(missing_ok=True)  # left by an earlier launch with this FLWR_HOME
    superlink.extra_env[COMPLETED_FILE_ENV] = str(completed)
    superlink.start()
    try:
        with staged_app(app_dir) as staged:
            command = [
                flower_executable("flwr"), "run", str(staged), "local", "--stream",
                "--federation-config", federation,
            ]  # fmt: skip
            for item in run_config or []:
                command += ["--run-config", item]
            print("+", shlex.join(command), f"  # {app_dir} staged", flush=True)
            code = _stream_until_done(command, superlink.env, completed, timeout_s)
        # `flwr run --stream` exits 0 even when the ServerApp failed: unless the ServerApp
        # said it finished every round, ask the SuperLink how the run ended.
        status = "finished:completed" if completed.exists() else superlink.run_status()
    finally:
        # A completed run has written everything: nothing of Flower's or Ray's own
        # shutdown is worth waiting for (Ray's processes take seconds to end on SIGTERM).
        superlink.stop(grace_s=0.0 if completed.exists() else 10.0)
    if code == 0 and not status.endswith("completed"):
        print(
            f"fedcoder run: the run ended with status '{status}' (see the log above)",
            file=sys.stderr,
        )
        return 1
    return code

"""Run the app in Flower's Simulation Engine and leave no process behind.

`flwr run` on a `:local:` connection starts a detached SuperLink that
outlives the run, and by default builds a fresh environment per run (pulling a
multi-GB CUDA torch). This launcher starts that SuperLink itself, with runtime
dependency installation off and a private FLWR_HOME, streams the run, and then
stops exactly the processes it started (by PID / process group).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    # Prefer the executable next to the running interpreter (the venv's), so a
    # run never picks up another installation's Flower.
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class LocalSuperLink:
    """A simulation SuperLink on loopback, owned by this process."""

    flwr_home: Path
    http_port: int = field(default_factory=_free_port)
    control_port: int = field(default_factory=_free_port)
    process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            # flower-superlink starts flower-superexec by name: put the venv first.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }

    def start(self, timeout_s: float = 60.0) -> None:
        runtime = self.flwr_home / "local-superlink"
        runtime.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        )
        command = [
            _bin("flower-superlink"), "--insecure", "--simulation",
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
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with code {self.process.returncode}; "
                    f"see {runtime / 'superlink.log'}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/health", timeout=1).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"flower-superlink did not become healthy within {timeout_s:.0f} s")

    def run_status(self) -> str:
        """Status of the most recent run on this SuperLink, e.g. 'finished:completed'."""
        listing = subprocess.run(
            [_bin("flwr"), "ls", "local", "--format", "json"],
            env=self.env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        try:
            runs = json.loads(listing.stdout)["runs"]
        except (json.JSONDecodeError, KeyError):
            return "unknown"
        return runs[-1]["status"] if runs else "unknown"

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the SuperLink and every process it started, by PID.

        Flower detaches its children (superexec, the simulation, Ray) into
        their own sessions, so a process group does not reach them: take the
        SuperLink's descendant tree first, then terminate all of it.
        """
        if self.process is None:
            return
        try:
            root = psutil.Process(self.process.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(tree, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=grace_s)
        self.process.wait()


def run_simulation(
    app_dir: Path,
    *,
    num_supernodes: int = 10,
    client_cpus: int = 1,
    client_gpus: float = 0.0,
    run_config: list[str] | None = None,
    flwr_home: Path | None = None,
    timeout_s: float | None = None,
) -> int:
    """Run the app to completion with `flwr run --stream`; return its exit code."""
    home = flwr_home or Path(tempfile.mkdtemp(prefix="fedcoder-flwr-home-"))
    superlink = LocalSuperLink(home)
    federation = (
        f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus} "
        f"client-resources-num-gpus={client_gpus}"
    )
    command = [
        _bin("flwr"),
        "run",
        str(app_dir),
        "local",
        "--stream",
        "--federation-config",
        federation,
    ]
    for item in run_config or []:
        command += ["--run-config", item]
    print("+", shlex.join(command), flush=True)
    superlink.start()
    try:
        code = subprocess.run(command, env=superlink.env, timeout=timeout_s).returncode
        # `flwr run --stream` exits 0 even when the ServerApp failed: ask the
        # SuperLink (ours holds this one run only) how the run ended.
        status = superlink.run_status()
    finally:
        superlink.stop()
    if code == 0 and not status.endswith("completed"):
        print(
            f"fedcoder run: the run ended with status '{status}' (see the log above)",
            file=sys.stderr,
        )
        return 1
    return code

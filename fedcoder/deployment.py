"""The app on Flower's Deployment Engine, on this machine: `fedcoder deploy`.

One SuperLink and N SuperNodes on loopback, secure as in a real deployment:
TLS on every connection to the SuperLink (SuperNodes, the `flwr` CLI, the
SuperLink's own ServerApp runtime) and SuperNode authentication, so only
SuperNodes whose public keys were registered may connect. Each SuperNode names
its data in its node config. By default every SuperNode runs with
`--isolation process` and a resident ClientApp worker
(`fedcoder.clientapp_worker`), so its base model is loaded once, not once per
round. The launcher runs the app with `flwr run --stream`, then stops exactly
the processes it started. docs/deployment.md has the same steps for several
machines.
"""

from __future__ import annotations

import json
import shlex
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from fedcoder.certs import TlsFiles, write_node_keys, write_tls_files
from fedcoder.processes import (
    flower_env,
    flower_executable,
    free_port,
    healthy,
    latest_run_status,
    process_tree,
    staged_app,
    stop_processes,
    wait_until,
)

CONNECTION = "fedcoder-local"


@dataclass
class SuperNode:
    """One SuperNode this launcher started (and its resident worker, if any)."""

    name: str
    node_config: str
    process: subprocess.Popen
    runtime_port: int
    log: Path
    home: Path
    node_id: int | None = None  # from registration; None for an unregistered node
    worker: subprocess.Popen | None = None


class LocalDeployment:
    """A SuperLink and SuperNodes on loopback, owned by this process.

    `insecure=True` turns TLS and SuperNode authentication off (for debugging
    only); `resident=False` keeps Flower's default subprocess isolation, where
    every message starts a fresh ClientApp process.
    """

    def __init__(self, workdir: Path, *, insecure: bool = False, resident: bool = True) -> None:
        self.workdir = workdir.resolve()
        self.insecure = insecure
        self.resident = resident
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.port = free_port()
        self.tls: TlsFiles | None = None
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[SuperNode] = []
        # Every process seen in our trees (psutil compares PID and start time,
        # so a reused PID is a different process). A SuperNode that dies orphans
        # its children, which then drop out of any tree we could walk at stop time.
        self._seen: set[psutil.Process] = set()

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the SuperLink and wait until it answers on its (TLS) port."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        connection = [f"address = {json.dumps(self.address)}"]
        command = [flower_executable("flower-superlink")]
        if self.insecure:
            connection.append("insecure = true")
            command.append("--insecure")
        else:
            self.tls = write_tls_files(self.workdir / "credentials")
            connection.append(f"root-certificates = {json.dumps(str(self.tls.ca_certificate))}")
            command += [
                "--ssl-ca-certfile", str(self.tls.ca_certificate),
                "--ssl-certfile", str(self.tls.server_certificate),
                "--ssl-keyfile", str(self.tls.server_key),
                "--enable-supernode-auth",
            ]  # fmt: skip
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            + "\n".join(connection)
            + "\n"
        )
        # No --database: the state stays in memory. With an SQLite file, a busy
        # host made the SuperLink answer "database is locked" (HTTP 500), which
        # killed the ServerApp mid-run.
        command += [
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        log = self.logs / "superlink.log"
        # cwd: the ServerApp runs under the SuperLink, and a relative results.dir
        # should resolve against where the user ran us.
        self.superlink = _start(command, self.env, log, cwd=Path.cwd())
        scheme = "http" if self.insecure else "https"
        wait_until(
            lambda: healthy(f"{scheme}://{self.address}", self._verify()),
            self.superlink,
            what="flower-superlink",
            timeout_s=timeout_s,
            log=log,
        )
        self._remember()

    def register(self, public_key: Path) -> int:
        """Register a SuperNode public key with the SuperLink; return its node id."""
        result = self._flwr("supernode", "register", str(public_key), CONNECTION)
        return int(json.loads(result)["node-id"])

    def add_supernode(self, node_config: str, *, register: bool = True) -> SuperNode:
        """Start a SuperNode with a new key pair; `register=False` leaves its key unregistered.

        Returns at once: `wait_for_supernodes` waits until they are online.
        """
        name = f"supernode-{len(self.supernodes)}"
        home = self.workdir / name
        runtime_port = free_port()
        command = [
            flower_executable("flower-supernode"),
            "--superlink", self.address,
            "--node-config", node_config,
            "--port", str(runtime_port),
            "--isolation", "process" if self.resident else "subprocess",
        ]  # fmt: skip
        node_id = None
        if self.insecure:
            command.append("--insecure")
        else:
            assert self.tls is not None, "start() first"
            keys = write_node_keys(home, "auth-key")
            node_id = self.register(keys.public_key) if register else None
            command += [
                "--root-certificates", str(self.tls.ca_certificate),
                "--auth-supernode-private-key", str(keys.private_key),
            ]  # fmt: skip
        log = self.logs / f"{name}.log"
        # Each SuperNode gets its own FLWR_HOME, as on its own machine.
        process = _start(command, flower_env(home / "flwr-home"), log)
        node = SuperNode(name, node_config, process, runtime_port, log, home, node_id)
        self.supernodes.append(node)
        self._remember()
        return node

    def wait_for_supernodes(
        self, nodes: Sequence[SuperNode] | None = None, timeout_s: float = 90.0
    ) -> None:
        """Start the resident workers, then wait until the SuperNodes (default: all) are online."""
        assert self.superlink is not None, "start() first"
        nodes = self.supernodes if nodes is None else nodes
        for node in nodes:
            if self.resident and node.worker is None:
                self._start_worker(node, timeout_s)
        wanted = {n.node_id for n in nodes if n.node_id is not None}

        def ready() -> bool:
            for node in nodes:
                if node.process.poll() is not None:
                    raise RuntimeError(
                        f"{node.name} exited with code {node.process.returncode}; see {node.log}"
                    )
            online = self.online_node_ids()
            if wanted:
                return wanted <= online
            # Without authentication node ids are unknown in advance: count them.
            return len(online) >= sum(n.process.poll() is None for n in self.supernodes)

        wait_until(ready, self.superlink, what="the SuperNodes", timeout_s=timeout_s)
        self._remember()

    def online_node_ids(self) -> set[int]:
        """Node ids the SuperLink currently counts as online."""
        nodes = json.loads(self._flwr("supernode", "list", CONNECTION))["nodes"]
        return {int(n["node-id"]) for n in nodes if n["status"] == "online"}

    def run(
        self, app_dir: Path, run_config: Sequence[str] = (), timeout_s: float | None = None
    ) -> int:
        """Run the app with `flwr run --stream` to the end; 0 if the run completed."""
        with staged_app(app_dir) as staged:
            command = [flower_executable("flwr"), "run", str(staged), CONNECTION, "--stream"]
            for item in run_config:
                command += ["--run-config", item]
            print("+", shlex.join(command), f"  # {app_dir} staged", flush=True)
            client = subprocess.Popen(command, env=self.env)
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            try:
                while client.poll() is None:
                    self._watch_supernodes()
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"the run did not finish within {timeout_s:.0f} s")
                    time.sleep(0.5)
            finally:
                if client.poll() is None:
                    client.terminate()
                    client.wait()
        status = latest_run_status(self.env, CONNECTION)
        if client.returncode == 0 and not status.endswith("completed"):
            print(f"fedcoder deploy: the run ended with status '{status}'", file=sys.stderr)
            return 1
        return client.returncode

    def kill_supernode(self, node: SuperNode) -> None:
        """SIGKILL one SuperNode alone, as a crash would; its children see it gone and exit."""
        self._remember()
        node.process.kill()
        node.process.wait()  # reap it, so children watching its PID see it gone

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every process this deployment started: SuperNodes first, then the SuperLink."""
        self._remember()
        superlink = set() if self.superlink is None else set(self._tree(self.superlink))
        stop_processes(self._seen - superlink, grace_s)
        stop_processes(superlink, grace_s)
        for process in self._popens():
            process.wait()

    @property
    def processes(self) -> list[psutil.Process]:
        """Every process this deployment started, directly or through Flower, seen so far."""
        self._remember()
        return list(self._seen)

    def _start_worker(self, node: SuperNode, timeout_s: float) -> None:
        wait_until(
            lambda: healthy(f"http://127.0.0.1:{node.runtime_port}"),
            node.process,
            what=node.name,
            timeout_s=timeout_s,
            log=node.log,
        )
        # The SuperNode's Runtime API listens on loopback only, hence plain HTTP.
        node.worker = _start(
            [sys.executable, "-m", "fedcoder.cli", "clientapp-worker",
             "--runtime-api-address", f"127.0.0.1:{node.runtime_port}", "--insecure",
             "--parent-pid", str(node.process.pid)],
            flower_env(node.home / "flwr-home"),
            self.logs / f"{node.name}-worker.log",
        )  # fmt: skip

    def _flwr(self, *args: str) -> str:
        result = subprocess.run(
            [flower_executable("flwr"), *args, "--format", "json"],
            env=self.env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def _verify(self) -> ssl.SSLContext | bool:
        if self.tls is None:
            return True
        return ssl.create_default_context(cafile=str(self.tls.ca_certificate))

    def _popens(self) -> list[subprocess.Popen]:
        started = [self.superlink] + [n.process for n in self.supernodes]
        started += [n.worker for n in self.supernodes]
        return [p for p in started if p is not None]

    def _tree(self, popen: subprocess.Popen) -> list[psutil.Process]:
        return process_tree(popen.pid) if popen.returncode is None else []

    def _remember(self) -> None:
        for popen in self._popens():
            self._seen.update(self._tree(popen))

    def _watch_supernodes(self) -> None:
        """Reap SuperNodes that died (their workers watch the PID) and say so once."""
        self._remember()
        for node in self.supernodes:
            if node.process.returncode is None and node.process.poll() is not None:
                print(
                    f"fedcoder deploy: {node.name} exited with code {node.process.returncode} "
                    f"(see {node.log}); the run continues without it",
                    file=sys.stderr,
                    flush=True,
                )


def run_local_deployment(
    app_dir: Path,
    *,
    num_supernodes: int = 2,
    node_configs: Sequence[str] = (),
    run_config: Sequence[str] = (),
    insecure: bool = False,
    resident: bool = True,
    workdir: Path | None = None,
    timeout_s: float | None = None,
) -> int:
    """Start a local deployment, run the app on it, stop it; return the run's exit code.

    SuperNode i gets `node_configs[i]`, or by default partition i of
    `num_supernodes` of the run's dataset.
    """
    if node_configs and len(node_configs) != num_supernodes:
        raise ValueError(f"{len(node_configs)} node configs for {num_supernodes} SuperNodes")
    workdir = workdir or Path(tempfile.mkdtemp(prefix="fedcoder-deploy-"))
    configs = list(node_configs) or [
        f"partition-id={i} num-partitions={num_supernodes}" for i in range(num_supernodes)
    ]
    security = "no TLS, no SuperNode authentication" if insecure else "TLS, node authentication"
    with LocalDeployment(workdir, insecure=insecure, resident=resident) as deployment:
        deployment.start()
        print(f"SuperLink on {deployment.address}: {security}; files in {workdir}", flush=True)
        for node_config in configs:
            node = deployment.add_supernode(node_config)
            ident = f"registered as node {node.node_id}, " if node.node_id is not None else ""
            print(f"{node.name}: {ident}node config '{node_config}', log {node.log}", flush=True)
        deployment.wait_for_supernodes()
        print(f"{num_supernodes} SuperNodes online", flush=True)
        return deployment.run(app_dir, run_config, timeout_s)


def _start(
    command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)

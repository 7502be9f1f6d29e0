"""Start Flower's processes and stop exactly those, by PID.

Shared by the simulation launcher (`fedcoder run`) and the local deployment
(`fedcoder deploy`). Flower detaches the processes it starts itself (SuperExec,
ServerApp, ClientApps) into their own sessions, so a process group does not
reach them: whoever stops a Flower process first collects its descendant tree,
then terminates all of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import httpx
import pathspec
import psutil

# httpx logs every request at INFO: health polls would flood the console.
logging.getLogger("httpx").setLevel(logging.WARNING)


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_executable(name: str) -> str:
    """The Flower command `name`, preferring the one next to the running interpreter.

    So a run never picks up another installation's Flower.
    """
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: this venv first, a private FLWR_HOME, no installs."""
    return {
        **os.environ,
        # Flower starts flower-superexec and the app processes by name: put the venv first.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def wait_until(
    ready: Callable[[], bool],
    process: subprocess.Popen,
    *,
    what: str,
    timeout_s: float,
    log: Path | None = None,
) -> None:
    """Poll `ready` until it holds; raise if `process` exits first or time runs out."""
    where = f"; see {log}" if log else ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}{where}")
        if ready():
            return
        time.sleep(0.3)
    raise RuntimeError(f"{what} was not ready within {timeout_s:.0f} s{where}")


def healthy(url: str, verify: ssl.SSLContext | bool = True) -> bool:
    """Whether a Flower HTTP API answers its `/health` route at `url` now."""
    try:
        return httpx.get(f"{url}/health", timeout=1, verify=verify).is_success
    except httpx.HTTPError:
        return False


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants, now (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_processes(processes: Iterable[psutil.Process], grace_s: float = 10.0) -> None:
    """SIGTERM each process, then SIGKILL whichever is still alive after `grace_s`.

    psutil refuses to signal a PID that was reused by a new process, so a
    process collected earlier is safe to pass even if it has exited since.
    """
    processes = list(processes)
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5.0)  # SIGKILL cannot be ignored: this is quick


def latest_run_status(env: dict[str, str], connection: str) -> str:
    """Status of the most recent run on a SuperLink connection, e.g. 'finished:completed'.

    `flwr run --stream` exits 0 even when the ServerApp failed, so launchers ask.
    """
    listing = subprocess.run(
        [flower_executable("flwr"), "ls", connection, "--format", "json"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    try:
        runs = json.loads(listing.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        return "unknown"
    # The SuperLink's database outlives a launch that reuses its FLWR_HOME (a
    # resumed run): the newest run is the one submitted last, not the last listed.
    newest = max(runs, key=lambda run: run.get("pending-at") or "", default=None)
    return newest["status"] if newest else "unknown"


def processes_with_home(flwr_home: Path) -> list[psutil.Process]:
    """Every process whose environment names this private FLWR_HOME.

    Each launcher gives its Flower processes a FLWR_HOME of their own, and
    everything they start inherits it; this also finds the ones that were
    re-parented away from the tree (Ray's workers, say) before it was collected.
    """
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FLWR_HOME") == str(flwr_home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@contextlib.contextmanager
def staged_app(app_dir: Path) -> Iterator[Path]:
    """The app's files less what its .gitignore ignores, in a temporary directory.

    `flwr run DIR` builds the app's FAB by reading the path of every file under DIR
    and only then drops what .gitignore names (flwr 1.42), so a virtual environment
    inside the app (tens of thousands of files) costs seconds on every run. Here
    ignored directories are never entered; Flower still applies all of its own rules
    to what is staged, so the FAB is the same. Files are hard links where the
    filesystem allows (Flower skips symbolic links), else copies.
    """
    app_dir = app_dir.resolve()
    gitignore = app_dir / ".gitignore"
    lines = gitignore.read_text(encoding="utf-8").splitlines() if gitignore.is_file() else []
    ignored = pathspec.GitIgnoreSpec.from_lines(lines)
    with tempfile.TemporaryDirectory(prefix="fedcoder-app-") as tmp:
        staged = Path(tmp) / app_dir.name
        for folder, dirs, files in os.walk(app_dir):
            relative = Path(folder).relative_to(app_dir)
            dirs[:] = [d for d in dirs if not ignored.match_file(f"{relative / d}/")]
            (staged / relative).mkdir(parents=True, exist_ok=True)
            for name in files:
                source = Path(folder) / name
                if source.is_symlink() or ignored.match_file(str(relative / name)):
                    continue
                try:
                    os.link(source, staged / relative / name)
                except OSError:  # another filesystem, or no hard links there
                    shutil.copy2(source, staged / relative / name)
        yield staged

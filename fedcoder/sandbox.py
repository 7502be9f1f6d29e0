"""Sandboxed execution of untrusted Python, JavaScript and C++ programs.

Model completions are untrusted code. Every program runs through
``fedcoder/_sandbox_launcher.py`` in a fresh temporary directory (removed afterwards) with
CPU-time, memory, file-size and process-count limits, stdin on /dev/null, stdout
discarded, stderr capped, a scrubbed environment, and a wall-clock limit after which its
whole process group is killed. On top of that the strongest isolation the machine allows
is used, probed once per process and reported by :func:`isolation_description`:

``namespaces`` (root on Linux)
    Private mount, PID, network and IPC namespaces: the filesystem is read-only except the
    program's directory and fresh tmpfs on /tmp and /dev/shm, there is no network, and
    every process dies with the namespace's PID 1. The program runs as a throwaway uid.
``setuid`` (root, but namespaces refused, e.g. in an unprivileged container)
    A throwaway uid per run; afterwards every process and /tmp file of that uid is removed.
``plain`` (anyone else)
    Resource limits, process group and environment scrubbing only.

``FEDCODER_SANDBOX_ISOLATION=setuid`` (or ``plain``) caps the mode. See docs/sandbox.md.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from fedcoder._sandbox_launcher import UID_BASE

Language = Literal["python", "javascript", "cpp"]
Status = Literal["passed", "failed", "timeout", "compile_error"]

_LAUNCHER = str(Path(__file__).with_name("_sandbox_launcher.py"))
_MODES = ("namespaces", "setuid", "plain")
_MODE_VARIABLE = "FEDCODER_SANDBOX_ISOLATION"
_DESCRIPTIONS = {
    "namespaces": "linux namespaces (mount, pid, net, ipc) + read-only root with private "
    "/tmp + throwaway uid + rlimits + process group",
    "setuid": "throwaway uid + rlimits + process group",
    "plain": "rlimits + process group",
}
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_SHARED_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_EXCERPT_CHARS = 1000
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Per-program limits. Timeouts are wall-clock seconds."""

    python_timeout_s: float = 3.0
    node_timeout_s: float = 5.0
    cpp_compile_timeout_s: float = 15.0
    cpp_run_timeout_s: float = 15.0
    # Address space (RLIMIT_AS) for Python, g++ and C++ programs. Node gets RLIMIT_DATA of
    # the same size instead: V8 reserves far more address space than it ever uses.
    memory_mb: int = 2048
    max_output_bytes: int = 65536  # of stderr; the program is killed beyond it
    max_file_size_mb: int = 16
    max_processes: int = 64


@dataclass(frozen=True)
class Program:
    language: Language
    source: str  # a complete program: for HumanEval, prompt + completion + tests


@dataclass(frozen=True)
class ExecResult:
    status: Status
    # Exit code, 128 + N if signal N killed the program, None if the sandbox stopped it
    # (wall-clock or output limit).
    returncode: int | None
    stderr: str  # the last ~1000 characters, where tracebacks and failed assertions are
    duration_s: float  # wall clock, compilation included


def execute(program: Program, limits: Limits = Limits()) -> ExecResult:
    """Run one program in the sandbox; "passed" means it exited 0 within the limits."""
    runner = _RUNNERS[program.language]
    with _workdir() as workdir:
        return runner(program.source, workdir, limits)


def execute_many(
    programs: Sequence[Program],
    limits: Limits = Limits(),
    workers: int | None = None,
    progress: bool = False,
) -> list[ExecResult]:
    """Run programs in parallel (one per CPU by default); results keep the input order."""
    _isolation(_requested_mode())  # probe once here rather than in every worker at once
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = [pool.submit(execute, program, limits) for program in programs]
        try:
            for future in tqdm(
                as_completed(futures), total=len(futures), desc="sandbox", disable=not progress
            ):
                future.result()  # a broken sandbox (say, node missing) stops the batch at once
        except BaseException:
            pool.shutdown(cancel_futures=True)  # also after Ctrl-C: start nothing new
            raise
        return [future.result() for future in futures]


def isolation_description() -> str:
    """The isolation programs actually get here, for results.json."""
    return _isolation(_requested_mode())[1]


# --- isolation probing --------------------------------------------------------------------


def _requested_mode() -> str:
    mode = os.environ.get(_MODE_VARIABLE, _MODES[0])
    if mode not in _MODES:
        raise ValueError(f"{_MODE_VARIABLE} must be one of {', '.join(_MODES)}, not {mode!r}")
    return mode


@functools.cache
def _isolation(requested: str) -> tuple[str, str]:
    """(mode, description) of the strongest mode, at most ``requested``, that works here."""
    unavailable = [] if requested == _MODES[0] else [f"disabled by {_MODE_VARIABLE}"]
    for mode in _MODES[_MODES.index(requested) :]:
        reason = _unavailable_reason(mode)
        if reason is None:
            detail = f" (namespaces unavailable: {'; '.join(unavailable)})" if unavailable else ""
            return mode, _DESCRIPTIONS[mode] + detail
        unavailable.append(f"{mode}: {reason}")
    raise RuntimeError("the sandbox cannot run programs: " + "; ".join(unavailable))


def _unavailable_reason(mode: str) -> str | None:
    """Why ``mode`` does not work here, or None if a trivial program runs under it."""
    if not hasattr(os, "pidfd_open"):
        return "fedcoder.sandbox needs Linux 5.3 or later"
    if mode != "plain" and os.geteuid() != 0:
        return "needs root"
    with _workdir() as workdir:
        # A generous timeout: a busy machine must not be mistaken for a broken sandbox.
        run = _launch(mode, workdir, [_PYTHON, "-I", "-c", "pass"], 30.0, Limits(), "AS")
    if run.returncode == 0:
        return None
    return run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"


# --- languages ----------------------------------------------------------------------------


def _execute_python(source: str, workdir: str, limits: Limits) -> ExecResult:
    Path(workdir, "main.py").write_text(source, encoding="utf-8")
    return _result(_run(workdir, [_PYTHON, "-I", "main.py"], limits.python_timeout_s, limits, "AS"))


def _execute_javascript(source: str, workdir: str, limits: Limits) -> ExecResult:
    Path(workdir, "main.js").write_text(source, encoding="utf-8")
    # RLIMIT_DATA, not RLIMIT_AS: V8 reserves address space it never commits (WebAssembly
    # alone reserves ~10 GB), but committed memory counts towards the data limit. A JS heap
    # below that limit makes V8 fail with a clean "heap out of memory" first.
    heap_flag = f"--max-old-space-size={limits.memory_mb * 3 // 4}"
    argv = [_tool("node"), heap_flag, "main.js"]
    return _result(_run(workdir, argv, limits.node_timeout_s, limits, "DATA"))


def _execute_cpp(source: str, workdir: str, limits: Limits) -> ExecResult:
    Path(workdir, "main.cpp").write_text(source, encoding="utf-8")
    compiler = [_tool("g++"), "-std=c++17", "-O0", "-o", "main", "main.cpp"]
    compiled = _run(workdir, compiler, limits.cpp_compile_timeout_s, limits, "AS")
    if compiled.returncode != 0:  # includes a compilation that ran out of time
        return ExecResult(
            "compile_error", compiled.returncode, compiled.stderr, compiled.duration_s
        )
    ran = _result(_run(workdir, ["./main"], limits.cpp_run_timeout_s, limits, "AS"))
    return replace(ran, duration_s=compiled.duration_s + ran.duration_s)


_RUNNERS: dict[str, Callable[[str, str, Limits], ExecResult]] = {
    "python": _execute_python,
    "javascript": _execute_javascript,
    "cpp": _execute_cpp,
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed; the sandbox needs it on PATH")
    return path


def _result(run: _Run) -> ExecResult:
    if run.timed_out:
        status: Status = "timeout"
    else:
        status = "passed" if run.returncode == 0 else "failed"
    return ExecResult(status, run.returncode, run.stderr, run.duration_s)


# --- running one command --------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    returncode: int | None  # None: stopped by the sandbox
    timed_out: bool
    stderr: str
    duration_s: float


def _run(
    workdir: str, argv: list[str], timeout_s: float, limits: Limits, memory_rlimit: str
) -> _Run:
    mode, _ = _isolation(_requested_mode())
    return _launch(mode, workdir, argv, timeout_s, limits, memory_rlimit)


def _rlimits(limits: Limits, timeout_s: float, memory_rlimit: str) -> dict[str, int]:
    return {
        # The wall clock is the real limit; CPU time bounds what a process that escaped
        # the final kill (possible in "plain" mode) can still burn.
        "CPU": math.ceil(timeout_s) + 1,
        memory_rlimit: limits.memory_mb * _MIB,
        "FSIZE": limits.max_file_size_mb * _MIB,
        "NPROC": limits.max_processes,
    }


def _launch(
    mode: str, workdir: str, argv: list[str], timeout_s: float, limits: Limits, memory_rlimit: str
) -> _Run:
    command = [sys.executable, "-I", "-S", "-B", _LAUNCHER, "run", mode, workdir]
    for name, value in _rlimits(limits, timeout_s, memory_rlimit).items():
        command += ["--limit", f"{name}={value}"]
    for directory in _install_dirs(argv[0]):
        command += ["--expose", directory]
    start = time.monotonic()
    process = subprocess.Popen(
        [*command, "--", *argv],
        cwd=workdir,
        env=_environment(workdir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        ending, stderr = _wait(process, start + timeout_s, limits.max_output_bytes)
        duration_s = time.monotonic() - start
    finally:
        # Kill before reaping: until then the launcher's zombie keeps its process group id
        # from being reused by an unrelated group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert process.stderr is not None
        process.stderr.close()
        if mode == "setuid":
            _sweep(UID_BASE + process.pid)
    text = stderr.decode("utf-8", errors="replace")
    if ending == "timeout":
        text += f"\n[fedcoder sandbox: killed at the {timeout_s:g} s wall-clock limit]"
    elif ending == "overflow":
        text += f"\n[fedcoder sandbox: killed after {limits.max_output_bytes} bytes of output]"
    returncode = process.returncode if ending == "exited" else None
    if returncode is not None and returncode < 0:  # the launcher itself was killed
        returncode = 128 - returncode
    return _Run(returncode, ending == "timeout", _excerpt(text), duration_s)


# Programs run on the base interpreter, not a virtualenv's: a venv may live where the
# sandbox hides (a private /tmp) and untrusted code needs nothing from its packages.
_PYTHON = os.path.realpath(sys.executable)


def _install_dirs(executable: str) -> list[str]:
    """Directories the tool needs: its installation prefix (and a venv's base Python)."""
    if not os.path.isabs(executable):  # built in the work dir, e.g. ./main
        return []
    dirs = {os.path.dirname(os.path.dirname(os.path.realpath(executable)))}
    if executable == _PYTHON:
        dirs.add(os.path.realpath(sys.base_prefix))
    return sorted(dirs)


def _environment(workdir: str) -> dict[str, str]:
    """A fresh environment: nothing of the caller's (tokens, proxies, PYTHONPATH) leaks."""
    return {
        "PATH": _SAFE_PATH,
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "USER": "sandbox",
        "LOGNAME": "sandbox",
    }


def _wait(process: subprocess.Popen[bytes], deadline: float, cap: int) -> tuple[str, bytes]:
    """Collect stderr until the process exits, the deadline passes or stderr exceeds ``cap``.

    Returns ("exited" | "timeout" | "overflow", stderr). Waits on a pidfd rather than for
    end-of-file: a leftover child may hold stderr open after the program is done.
    """
    assert process.stderr is not None
    stderr = process.stderr.fileno()
    os.set_blocking(stderr, False)
    captured = bytearray()
    exited = os.pidfd_open(process.pid)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(stderr, selectors.EVENT_READ)
            selector.register(exited, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout", bytes(captured)
                ready = {key.fd for key, _ in selector.select(remaining)}
                if stderr in ready and _read_available(stderr, captured, cap):
                    selector.unregister(stderr)
                if len(captured) > cap:
                    return "overflow", bytes(captured[:cap])
                if exited in ready:
                    if stderr in selector.get_map():
                        _read_available(stderr, captured, cap)  # its last words
                    return "exited", bytes(captured[:cap])
    finally:
        os.close(exited)


def _read_available(fd: int, buffer: bytearray, cap: int) -> bool:
    """Append what ``fd`` has to offer (up to just past ``cap``); True at end of file."""
    while len(buffer) <= cap:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return False
        if not chunk:
            return True
        buffer += chunk
    return False


def _excerpt(text: str) -> str:
    # Keep the end: that is where tracebacks, failed assertions and our own notes are.
    return text if len(text) <= _EXCERPT_CHARS else "…" + text[-(_EXCERPT_CHARS - 1) :]


# --- clean-up -----------------------------------------------------------------------------


@contextlib.contextmanager
def _workdir() -> Iterator[str]:
    parent = tempfile.mkdtemp(prefix="fedcoder-sandbox-")
    # The work dir sits in a directory of ours rather than in world-writable /tmp, so its
    # owner (the program's uid) cannot rename it away and leave a symlink in its place.
    os.chmod(parent, 0o711)
    workdir = os.path.join(parent, "work")
    os.mkdir(workdir, 0o700)
    try:
        yield workdir
    finally:
        _remove_tree(parent)


def _remove_tree(path: str) -> None:
    try:
        shutil.rmtree(path)
    except PermissionError:
        # Only without root: the program made its own directories unreadable.
        _make_removable(path)
        shutil.rmtree(path)


def _make_removable(path: str) -> None:
    os.chmod(path, 0o700)
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                _make_removable(entry.path)


def _sweep(uid: int) -> None:
    """Kill the processes of a finished run's throwaway uid and delete its shared files."""
    subprocess.run(
        [sys.executable, "-I", "-S", "-B", _LAUNCHER, "sweep", str(uid)],
        env={},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
    )
    for directory in _SHARED_WRITABLE_DIRS:
        with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
            for entry in entries:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    _remove_entry(entry)


def _remove_entry(entry: os.DirEntry[str]) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path, ignore_errors=True)
    else:
        os.unlink(entry.path)

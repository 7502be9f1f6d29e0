"""Tests for fedcoder.sandbox: real programs, real processes, no mocks."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from string import Template

import pytest

from fedcoder.sandbox import Limits, Program, execute, execute_many, isolation_description

# Short limits keep the hostile suite fast; 512 MB is plenty for the interpreters.
FAST = Limits(
    python_timeout_s=2.0,
    node_timeout_s=2.0,
    cpp_compile_timeout_s=15.0,
    cpp_run_timeout_s=2.0,
    memory_mb=512,
)
MARKER = f"fedcoder-hostile-{uuid.uuid4().hex}"
DESCRIPTION_PREFIX = {
    "namespaces": "linux namespaces",
    "setuid": "throwaway uid",
    "plain": "rlimits + process group",
}

needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")


def use_mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Run the test under isolation ``mode``, skipping it where the machine cannot."""
    monkeypatch.setenv("FEDCODER_SANDBOX_ISOLATION", mode)
    description = isolation_description()
    if not description.startswith(DESCRIPTION_PREFIX[mode]):
        pytest.skip(f"{mode} isolation unavailable here: {description}")


@pytest.fixture(params=["namespaces", "setuid", "plain"])
def any_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    use_mode(monkeypatch, request.param)
    return request.param


# The hostile suite needs an isolating mode: under "plain" as root a fork bomb is real.
@pytest.fixture(params=["namespaces", "setuid"])
def isolating_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    use_mode(monkeypatch, request.param)
    return request.param


# --- ordinary programs --------------------------------------------------------------------


def test_python_pass_and_fail(any_mode: str) -> None:
    passed = execute(Program("python", "def add(a, b):\n    return a + b\nassert add(1, 2) == 3\n"))
    failed = execute(Program("python", "assert 1 + 1 == 3, 'wrong sum'\n"))
    assert (passed.status, passed.returncode) == ("passed", 0)
    assert (failed.status, failed.returncode) == ("failed", 1)
    assert "AssertionError: wrong sum" in failed.stderr


def test_python_timeout(any_mode: str) -> None:
    result = execute(Program("python", "while True:\n    pass\n"), FAST)
    assert (result.status, result.returncode) == ("timeout", None)
    assert 2.0 <= result.duration_s < 4.0


@needs_node
def test_javascript(any_mode: str) -> None:
    passed = execute(
        Program(
            "javascript",
            "const x = [1, 2].map(v => v * 2);\nif (x[1] !== 4) throw new Error('bad');\n",
        )
    )
    failed = execute(Program("javascript", "throw new Error('wrong answer');\n"))
    timed_out = execute(Program("javascript", "while (true) {}\n"), FAST)
    assert passed.status == "passed"
    assert failed.status == "failed" and "wrong answer" in failed.stderr
    assert timed_out.status == "timeout"


@needs_gxx
def test_cpp(any_mode: str) -> None:
    correct = "#include <vector>\nint main() { std::vector<int> v{1, 2}; return v.size() != 2; }\n"
    passed = execute(Program("cpp", correct))
    failed = execute(Program("cpp", "#include <cassert>\nint main() { assert(1 + 1 == 3); }\n"))
    broken = execute(Program("cpp", "int main() { return undeclared; }\n"))
    assert (passed.status, passed.returncode) == ("passed", 0)
    assert failed.status == "failed" and failed.returncode == 128 + 6  # SIGABRT
    assert broken.status == "compile_error" and "undeclared" in broken.stderr


@needs_gxx
def test_cpp_run_timeout(any_mode: str) -> None:
    result = execute(Program("cpp", "int main() { volatile int x = 0; while (true) x++; }\n"), FAST)
    assert result.status == "timeout"


def test_stderr_is_an_excerpt_of_the_end() -> None:
    result = execute(
        Program(
            "python", "import sys\nsys.stderr.write('x' * 5000 + 'THE END')\nraise SystemExit(2)\n"
        )
    )
    assert (result.status, result.returncode) == ("failed", 2)
    assert len(result.stderr) <= 1000 and result.stderr.endswith("THE END")


def test_no_state_leaks_between_runs(any_mode: str) -> None:
    paths = ["state.txt", os.path.join("~", "state.txt")]  # the work dir and $HOME
    if any_mode != "plain":  # only isolation can clean up the shared scratch dirs
        paths += [f"/tmp/{MARKER}.txt", f"/dev/shm/{MARKER}.txt"]
    write = "import os\n" + "".join(
        f"open(os.path.expanduser({path!r}), 'w').write('x')\n" for path in paths
    )
    check = "import os\n" + "".join(
        f"assert not os.path.exists(os.path.expanduser({path!r})), {path!r}\n" for path in paths
    )
    assert execute(Program("python", write)).status == "passed"
    second = execute(Program("python", check))
    assert second.status == "passed", second.stderr


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCODER_TEST_SECRET", "hunter2")
    program = (
        "import os\nassert 'FEDCODER_TEST_SECRET' not in os.environ\n"
        "assert os.environ['HOME'] == os.getcwd(), os.environ\n"
    )
    result = execute(Program("python", program))
    assert result.status == "passed", result.stderr


def test_execute_many_keeps_order() -> None:
    programs = [Program("python", f"raise SystemExit({code})") for code in [0, 3, 0, 5, 1, 0]]
    results = execute_many(programs, workers=2, progress=True)
    assert [r.returncode for r in results] == [0, 3, 0, 5, 1, 0]
    assert [r.status for r in results] == [
        "passed",
        "failed",
        "passed",
        "failed",
        "failed",
        "passed",
    ]


def test_isolation_description_reports_namespaces_when_available(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FEDCODER_SANDBOX_ISOLATION", raising=False)
    probe = ["unshare", "--net", "--mount", "--pid", "--ipc", "--fork", "true"]
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("namespaces need root on Linux with util-linux's unshare")
    if subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("this kernel or container forbids unshare")
    assert isolation_description().startswith("linux namespaces (mount, pid, net, ipc)")


# --- hostile programs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    name: str
    language: str
    source: str  # a string.Template: may use $port, $canary, $home_file, $tmp_file
    status: str  # the expected status; "failed|timeout" accepts either
    stderr: str = ""  # expected somewhere in the stderr excerpt
    needs_namespaces: bool = False


def marked(body: str) -> str:
    """Python that re-execs ``body`` with MARKER in argv, so its processes can be found."""
    return (
        f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {body!r}, {MARKER!r}])\n"
    )


DAEMON = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(60)
    os._exit(0)
os.wait()
"""

HOSTILE = [
    Hostile(
        "fork_bomb", "python", marked("import os\nwhile True:\n    os.fork()\n"), "failed|timeout"
    ),
    Hostile("infinite_loop", "python", marked("while True:\n    pass\n"), "timeout"),
    # Memory bombs grab 1 GiB at once: twice the limit, yet fine for the machine itself.
    Hostile("memory_bomb", "python", marked("hog = bytearray(1 << 30)\n"), "failed", "MemoryError"),
    Hostile(
        "stderr_flood",
        "python",
        marked("import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n"),
        "failed",
        "bytes of output",
    ),
    Hostile(
        "stdout_flood",
        "python",
        marked("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"),
        "timeout",
    ),
    Hostile("huge_file", "python", marked("open('big', 'wb').write(bytes(64 << 20))\n"), "failed"),
    Hostile("read_stdin", "python", marked("input()\n"), "failed", "EOFError"),
    Hostile("sleep_past_limit", "python", marked("import time\ntime.sleep(60)\n"), "timeout"),
    Hostile("daemon_outlives_parent", "python", marked(DAEMON + "raise SystemExit(1)\n"), "failed"),
    Hostile("daemon_then_hang", "python", marked(DAEMON + "while True:\n    pass\n"), "timeout"),
    Hostile(
        "network",
        "python",
        marked(
            "import socket\nsocket.create_connection(('127.0.0.1', $port), timeout=1)\n"
            "raise SystemExit(1)\n"
        ),
        "failed",
        "OSError",
        needs_namespaces=True,
    ),
    Hostile(
        "overwrite_canary", "python", marked("open('$canary', 'w').write('pwned')\n"), "failed"
    ),
    Hostile("delete_canary", "python", marked("import os\nos.remove('$canary')\n"), "failed"),
    Hostile("write_home", "python", marked("open('$home_file', 'w').write('pwned')\n"), "failed"),
    # Writing /tmp succeeds inside the sandbox, so the program fails its "check" itself.
    Hostile(
        "write_tmp",
        "python",
        marked("open('$tmp_file', 'w').write('pwned')\nraise SystemExit(1)\n"),
        "failed",
    ),
    Hostile(
        "kill_parent",
        "python",
        marked("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"),
        "failed",
        "PermissionError",  # the launcher runs as root, the program as a throwaway uid
    ),
    Hostile("js_infinite_loop", "javascript", "for (;;) {}\n", "timeout"),
    Hostile(
        "js_memory_bomb",
        "javascript",
        "const hog = Buffer.alloc(1 << 30, 1);\n",
        "failed",
        "allocation failed",
    ),
    Hostile(
        "cpp_fork_bomb",
        "cpp",
        "#include <unistd.h>\nint main(int argc, char** argv) {\n"
        '  if (argc < 2) execl("./main", "./main", "' + MARKER + '", nullptr);\n'
        "  for (;;) fork();\n}\n",
        "failed|timeout",
    ),
    Hostile(
        "cpp_memory_bomb",
        "cpp",
        "#include <vector>\nint main() { std::vector<char> hog(1 << 30, 1); }\n",
        "failed",
        "bad_alloc",
    ),
]


def leftover_processes() -> list[str]:
    """Command lines of live processes carrying MARKER."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if MARKER.encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def wait_for_no_leftovers(grace_s: float = 2.0) -> list[str]:
    # SIGKILLed processes take a moment to disappear from /proc.
    deadline = time.monotonic() + grace_s
    while (left := leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.mark.parametrize("hostile", HOSTILE, ids=[h.name for h in HOSTILE])
def test_hostile_program_is_contained(
    hostile: Hostile, isolating_mode: str, tmp_path: Path
) -> None:
    if hostile.needs_namespaces and isolating_mode != "namespaces":
        pytest.skip("only network namespaces keep a program off the network")
    if hostile.language == "javascript" and shutil.which("node") is None:
        pytest.skip("node is not installed")
    if hostile.language == "cpp" and shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    canary = tmp_path / "canary.txt"
    canary.write_text("intact")
    home_file = Path.home() / f"{MARKER}.txt"
    tmp_file = Path("/tmp") / f"{MARKER}.txt"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        source = Template(hostile.source).substitute(
            port=listener.getsockname()[1], canary=canary, home_file=home_file, tmp_file=tmp_file
        )
        started = time.monotonic()
        result = execute(Program(hostile.language, source), FAST)
        elapsed = time.monotonic() - started
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert result.status in hostile.status.split("|"), result
    assert hostile.stderr in result.stderr, result.stderr
    assert elapsed < 20, "bounded by the wall-clock limit (plus compilation)"
    assert wait_for_no_leftovers() == []
    assert canary.read_text() == "intact"
    assert not home_file.exists() and not tmp_file.exists()

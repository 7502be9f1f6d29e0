"""How `fedcoder run` waits for `flwr run --stream`: it returns once the ServerApp has
said it finished (Flower's own shutdown after the last round shows and saves nothing),
and otherwise as the command does."""

from __future__ import annotations

import sys
import threading
import time

import psutil
import pytest

from fedcoder.simulation import LOG_FLUSH_S, _stream_until_done

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


def test_returns_soon_after_the_server_app_finished_and_stops_the_stream(tmp_path):
    completed = tmp_path / "run-completed"
    threading.Timer(0.5, completed.write_text, args=("results/run\n",)).start()
    before = children()
    started = time.monotonic()
    assert _stream_until_done(SLEEPER, {}, completed, timeout_s=30) == 0
    assert time.monotonic() - started < 0.5 + LOG_FLUSH_S + 2.0
    assert children() <= before  # the still-running stream was stopped, not left behind


def test_without_the_file_the_command_decides(tmp_path):
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    assert _stream_until_done(failing, {}, tmp_path / "never", timeout_s=30) == 3


def test_a_run_past_its_timeout_is_stopped(tmp_path):
    before = children()
    with pytest.raises(TimeoutError, match="did not finish within 1 s"):
        _stream_until_done(SLEEPER, {}, tmp_path / "never", timeout_s=1)
    assert children() <= before

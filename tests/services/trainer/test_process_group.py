"""The trainer's `accelerate launch` child: logs to its file, and stopping it stops every rank."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.trainer.process_group import LaunchedGroup, free_port

# A leader that starts a "rank" (a grandchild in the same group), reports both pids, then waits.
SCRIPT = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("pids", rank.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited. Reaped in between: gone too.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_stop_ends_the_leader_and_its_ranks_and_the_log_holds_their_output(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "accelerate.log"
    group = LaunchedGroup([sys.executable, "-c", SCRIPT], log_path=log).start()
    try:
        _wait_for(lambda: "pids" in log.read_text() if log.exists() else False, timeout=30)
        rank = int(log.read_text().split()[1])
        assert group.alive() and _alive(rank) and group.returncode is None
    finally:
        group.stop(grace=5)
    assert not group.alive() and group.returncode is not None
    _wait_for(lambda: not _alive(rank), timeout=10)
    assert "pids" in group.log_tail()


def test_a_leader_that_exits_on_its_own_reports_its_status(tmp_path: Path) -> None:
    group = LaunchedGroup(
        [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
        log_path=tmp_path / "a.log",
    ).start()
    _wait_for(lambda: not group.alive(), timeout=30)
    group.stop()
    assert group.returncode == 3 and group.log_tail() == "boom"
    assert 1024 < free_port() < 65536


def test_stop_returns_in_bounded_time_when_sigkill_does_not_end_the_leader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process in uninterruptible sleep (a hung NFS or GPU driver call) outlives SIGKILL. Such
    a kernel is simulated by dropping every SIGKILL this test's process sends; the leader (a real
    process) ignores SIGTERM, so nothing ends it: `stop` must still return."""
    ignores_term = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(600)"
    )
    group = LaunchedGroup([sys.executable, "-c", ignores_term], log_path=tmp_path / "g.log").start()
    real_killpg, real_kill = os.killpg, os.kill
    try:
        _wait_for(lambda: "ready" in group.log_tail(), timeout=60)

        def drop_sigkill(real: Callable[[int, int], None]) -> Callable[[int, int], None]:
            return lambda pid, sig: None if sig == signal.SIGKILL else real(pid, sig)

        monkeypatch.setattr(os, "killpg", drop_sigkill(real_killpg))
        monkeypatch.setattr(os, "kill", drop_sigkill(real_kill))
        stopper = threading.Thread(target=lambda: group.stop(grace=0.5), daemon=True)
        stopper.start()
        stopper.join(timeout=60)
        assert not stopper.is_alive(), "stop() hangs on a process SIGKILL does not end"
        assert group.alive()  # it really did outlive the (dropped) SIGKILL
    finally:
        monkeypatch.undo()
        assert group.proc is not None
        real_killpg(group.proc.pid, signal.SIGKILL)
        group.proc.wait(timeout=30)

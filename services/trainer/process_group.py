"""The `accelerate launch` child of a training task: its own process group, its own log file.

The trainer's only subprocess, so it lives here rather than in `pairloop_local.processes` (dev
tooling that service images do not ship). Stopping it stops every rank: they are all in the
group. A task killed outright cannot run `stop`; then the ranks exit on their own when they see
their owner gone (`TrainingSpec.owner_pid`, `launch_entry.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LaunchedGroup", "free_port"]

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the ranks' rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LaunchedGroup:
    """`argv` in a new session (process group), stdout and stderr appended to `log_path`."""

    def __init__(self, argv: Sequence[str], *, log_path: Path) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LaunchedGroup:
        """Start the child; its log file is opened here and owned by the child from then on."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        """True while the group's leader runs."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The leader's exit status, None before it exits (or if it never started)."""
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines of the log, for an error message."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, *, grace: float = 10.0, kill_wait: float = 10.0) -> None:
        """SIGTERM the group, wait up to `grace` seconds, then SIGKILL whatever is left of it.

        After SIGKILL the wait is bounded too (`kill_wait`): a process in uninterruptible sleep
        (a hung NFS or GPU driver call) may never exit, and the worker must not hang with it.
        """
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(self.proc.pid, signal.SIGKILL)  # even if it left its group
                try:
                    self.proc.wait(timeout=kill_wait)
                except subprocess.TimeoutExpired:
                    log.error(
                        "process %d (%s) did not exit within %gs of SIGKILL (uninterruptible "
                        "I/O: a hung filesystem or device driver?); leaving it, see %s",
                        self.proc.pid,
                        " ".join(self.argv[:4]),
                        kill_wait,
                        self.log_path,
                    )
        # Ranks may outlive a leader that exited on its own.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

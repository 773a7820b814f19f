"""Starting pairloop's services as local processes on loopback, and stopping them for sure.

Used by the local stack (`pairloop run CONFIG --local`, `pairloop demo`) and by the integration
tests alike: each service is a real process (`python -m services.generator ...`) in a process
group of its own, awaited on its `/health` or `/ready` URL with a deadline, and stopped with its
whole group (vLLM's engine core and the Celery worker's pool children are in it).

Readiness is proven, not assumed: a service started with an `instance_env` gets a fresh nonce in
that environment variable, and `wait_ready` accepts a `/health` answer only when it echoes the
nonce and the child's pid. Whatever else holds the port (an orphan, another user's stack) is
reported as such instead of being talked to.

No orphans, whatever ends the parent (`kill -9` included), by two mechanisms:
* every child started from the main thread gets the Linux parent-death signal
  (PR_SET_PDEATHSIG = SIGKILL), so it dies with this process;
* a `GroupReaper` process holds a pipe from the parent and a list of process groups: when the
  pipe closes (the parent died, however) it SIGKILLs every group still registered, which takes
  the grandchildren the parent-death signal does not reach (the training process, vLLM workers).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

__all__ = [
    "GroupReaper",
    "ManagedProcess",
    "PortInUseError",
    "ProcessFailedError",
    "check_port_free",
    "free_port",
    "spawn_detached",
    "wait_for_http",
    "wait_until",
]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# After SIGKILL a process ends at once unless it is stuck in the kernel (a hung NFS read, a GPU
# driver call): then waiting longer does not help, and a stop must not hang the run with it.
KILL_WAIT_S = 10.0


class ProcessFailedError(RuntimeError):
    """A managed process exited or never became ready; the message carries its log's tail."""


class PortInUseError(ProcessFailedError):
    """A port we were to use is held by another process (which we must not talk to)."""


def check_port_free(port: int, *, what: str) -> None:
    """Raise PortInUseError if something already listens on 127.0.0.1:`port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as uvicorn and redis-server set it: a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise PortInUseError(
                f"{what}: port {port} on 127.0.0.1 is in use by another process "
                f"({os.strerror(exc.errno) if exc.errno else exc}); stop that process or choose "
                "another port"
            ) from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.1, what: str = "condition"
) -> None:
    """Poll `predicate` until it is true; raise TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(interval)


def wait_for_http(
    url: str,
    *,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    expect_status: int = 200,
    expect: Mapping[str, object] | None = None,
) -> None:
    """Poll `url` until it answers `expect_status`, `alive()` turns false, or `timeout` passes.

    With `expect`, the answer must be a JSON object holding those items (a service's pid and the
    nonce it was given): an answer without them comes from another process that holds the port,
    and raises PortInUseError at once.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    pause = 0.05
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not alive():
                raise ProcessFailedError(f"process exited while waiting for {url} ({last})")
            try:
                resp = client.get(url)
                if resp.status_code == expect_status:
                    if expect is None or _matches(resp, expect):
                        return
                    raise PortInUseError(
                        f"{url} answers, but not from the process we started (expected "
                        f"{dict(expect)}, got {resp.text[:200]!r}): another process holds the "
                        "port; stop it or choose another port"
                    )
                last = f"HTTP {resp.status_code}"
            except httpx.TransportError as exc:
                last = type(exc).__name__
            # Fast at first (a tiny model is ready in seconds), then at most once a second: a
            # 7B model loads for minutes, and each poll is a line in the service's access log.
            time.sleep(pause)
            pause = min(pause * 1.5, 1.0)
    raise ProcessFailedError(f"{url} did not answer {expect_status} within {timeout:.0f}s ({last})")


def _matches(resp: httpx.Response, expect: Mapping[str, object]) -> bool:
    try:
        body = resp.json()
    except ValueError:
        return False
    return isinstance(body, dict) and all(body.get(k) == v for k, v in expect.items())


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A preexec function: SIGKILL this child when its parent dies (Linux; elsewhere a no-op)."""

    def preexec() -> None:
        if not sys.platform.startswith("linux"):
            return
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would send the signal.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _reap_main() -> None:
    """The reaper process: read `+PGID`/`-PGID` lines from stdin; at EOF SIGKILL what is left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops in order
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        op, _, num = line.strip().partition(" ")
        if num.isdigit():
            (groups.add if op == "+" else groups.discard)(int(num))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def spawn_detached(
    argv: Sequence[str], *, log_path: str | Path, env: Mapping[str, str] | None = None
) -> int:
    """Start `argv` in a session of its own that outlives this process; return its pid.

    Unlike ManagedProcess, no parent-death signal and no reaper: a run started through the API
    must go on when the API stops. A thread reaps it if it ends while we are still here.
    """
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as log_file:
        proc = subprocess.Popen(
            list(argv),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
            start_new_session=True,  # not in our process group: a signal to ours misses it
        )
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
    return proc.pid


class GroupReaper:
    """A watchdog process that SIGKILLs registered process groups once this process is gone.

    It learns of the parent's death from its stdin pipe closing, which the kernel does for any
    death, SIGKILL included; the write end is not inherited by other children (close_fds).
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def start(self) -> GroupReaper:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from pairloop_local.processes import _reap_main; _reap_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # not in the terminal's group: Ctrl-C must not end it first
        )
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None or self._proc.poll() is not None:
            return
        with self._lock, contextlib.suppress(BrokenPipeError, ValueError):
            self._proc.stdin.write(line.encode())
            self._proc.stdin.flush()

    def register(self, pgid: int) -> None:
        self._send(f"+ {pgid}\n")

    def unregister(self, pgid: int) -> None:
        self._send(f"- {pgid}\n")

    def close(self) -> None:
        """Close the pipe: the reaper kills whatever is still registered, then exits."""
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
        self._proc = None

    def __enter__(self) -> GroupReaper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class ManagedProcess:
    """A child process in its own process group, logging to a file, stopped with its children.

    It dies with its parent (parent-death signal); with a `reaper`, so does its whole group.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: str | Path,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        reaper: GroupReaper | None = None,
        instance_env: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.reaper = reaper
        # The environment variable that carries this start's nonce into the child's settings.
        self.instance_env = instance_env
        self.instance: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.instance_env is not None:
            self.instance = secrets.token_hex(16)  # fresh per start: a restart is a new child
            self.env[self.instance_env] = self.instance
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                # preexec_fn is safe here: it only calls prctl (no locks, no allocation-heavy code).
                # The kernel sends the signal when the *thread* that forked exits: only the main
                # thread lives as long as the process (from others, the reaper is the guard).
                preexec_fn=(
                    _die_with_parent(os.getpid())
                    if threading.current_thread() is threading.main_thread()
                    else None
                ),
            )
        finally:
            log.close()
        if self.reaper is not None:
            self.reaper.register(self.proc.pid)  # its pgid: start_new_session made it a leader
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ProcessFailedError(f"{self.name} was never started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def identity(self) -> dict[str, object]:
        """What this child's `/health` must echo (`pairloop.contracts.health`)."""
        return {"pid": self.pid, "instance": self.instance}

    def wait_ready(
        self, url: str, *, timeout: float = 120.0, health_url: str | None = None
    ) -> None:
        """Wait for `url` to answer 200; on failure, stop the process and raise with its log.

        With `health_url` (and an `instance_env`), first wait until `health_url` echoes this
        child's pid and nonce: only then is the port known to be ours.
        """
        deadline = time.monotonic() + timeout
        try:
            if health_url is not None and self.instance is not None:
                wait_for_http(health_url, timeout=timeout, alive=self.alive, expect=self.identity())
            wait_for_http(url, timeout=max(deadline - time.monotonic(), 1.0), alive=self.alive)
        except PortInUseError as exc:
            self.stop()
            raise PortInUseError(f"{self.name}: {exc}") from None
        except ProcessFailedError as exc:
            self.stop()
            raise ProcessFailedError(
                f"{self.name} did not become ready: {exc}\n--- {self.log_path} ---\n{self.log_tail()}"
            ) from None

    def kill(self, *, wait: float = KILL_WAIT_S) -> bool:
        """SIGKILL the whole group at once, as a crash would; wait at most `wait` seconds.

        Returns False (and logs) if the leader is still there after that: stuck in the kernel,
        where no signal reaches it; the caller goes on rather than hanging with it.
        """
        if self.proc is None or self.proc.poll() is not None:
            return True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s (pid %d) still alive %.0fs after SIGKILL (stuck in the kernel?); leaving it",
                self.name,
                self.proc.pid,
                wait,
            )
            return False
        return True

    def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM the group, wait up to `grace` seconds, then SIGKILL what is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        # Children (vLLM's engine core) may outlive a leader that exited on its own.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.reaper is not None:
            self.reaper.unregister(self.proc.pid)

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

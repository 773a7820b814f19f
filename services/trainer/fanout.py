"""A job with `dpo.num_machines` N > 1, spread by the system over N trainer workers.

The worker that takes the job leads (machine 0): it holds the job's lock, writes the spec, hosts
the rendezvous at its advertised address (`advertise_address`, a free or configured port) and
sends one `pairloop.train_dpo_rank` task per other machine to the same queue. Each carries the job
id, the attempt id, the machine's rank and the endpoint; an idle worker takes it (a busy one holds
its unacknowledged job, prefetch 1, so it takes nothing else), checks that the attempt still holds
the job's lock, takes the machine's seat and runs the machine's ranks with the same `accelerate
launch` command.

Seats are flocks on `machines/machine-K.lock` in the job's work directory (the shared model
store), holding the attempt id and the worker's name: the kernel drops one whose worker died,
even by SIGKILL, so the leader sees a machine arrive and leave without any heartbeat. All or
nothing: a machine that has not arrived within `arrival_timeout_s`, or that leaves before its
ranks ended well (`machine-K.done`), fails the attempt; the leader stops its ranks (they would
wait on the lost peer's collectives) and tries again with a fresh attempt id, up to
`machine_attempts` times, resuming from the last sharded checkpoint. A machine's ranks stop when
the attempt that sent them no longer holds the job's lock. Only the leader validates and
publishes (`runner.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, Field

from pairloop.atomic import atomic_write_text
from pairloop.errors import ServerError
from pairloop.jobs import TRAIN_RANK_TASK_NAME, TrainProgress
from services.trainer.launcher import (
    SPEC_FILE,
    Rendezvous,
    accelerate_command,
    run_attempt,
)
from services.trainer.process_group import LaunchedGroup, free_port
from services.trainer.settings import TrainerSettings
from services.trainer.spec import (
    TrainingOutcome,
    TrainingSpec,
    job_lock_holder,
    lock_holder,
    remove_incomplete_checkpoints,
    renew_attempt,
)

__all__ = [
    "MACHINES_DIR",
    "MachineShare",
    "MachineWatch",
    "run_machine_share",
    "seat_path",
    "train_across_machines",
]

log = logging.getLogger(__name__)

MACHINES_DIR = "machines"
_POLL_SECONDS = 0.2


class MachineShare(BaseModel):
    """One machine's share of one attempt: the `pairloop.train_dpo_rank` task's argument."""

    job_id: str = Field(min_length=1)
    attempt: str = Field(min_length=1)
    machine_rank: int = Field(ge=1)
    machines: int = Field(ge=2)
    endpoint: str = Field(pattern=r"^[A-Za-z0-9.\[\]:-]+:\d{1,5}$")


class AttemptFailed(ServerError):
    """A machine missing or lost: the attempt fails, the job is tried again."""


def seat_path(work: Path, machine_rank: int) -> Path:
    """The flock a machine's worker holds while its ranks run."""
    return work / MACHINES_DIR / f"machine-{machine_rank}.lock"


def _done_path(work: Path, machine_rank: int) -> Path:
    return work / MACHINES_DIR / f"machine-{machine_rank}.done"


class MachineWatch:
    """The leader's view of the other machines of one attempt; `check` raises AttemptFailed."""

    def __init__(self, work: Path, *, attempt: str, machines: int, arrival_timeout: float) -> None:
        self.work = work
        self.attempt = attempt
        self.machines = machines
        self.arrival_timeout = arrival_timeout
        self.started = time.monotonic()
        self.arrived: dict[int, str] = {}  # machine rank -> the worker that took its share

    def _seated(self, rank: int) -> str | None:
        holder = lock_holder(seat_path(self.work, rank))
        lines = (holder or "").splitlines()
        if lines and lines[0] == self.attempt:
            return lines[1] if len(lines) > 1 else "?"
        return None

    def _done(self, rank: int) -> bool:
        try:
            return _done_path(self.work, rank).read_text().strip() == self.attempt
        except OSError:
            return False

    def check(self) -> None:
        """Raise AttemptFailed when a machine is lost, or missing past the arrival timeout."""
        missing = []
        for rank in range(1, self.machines):
            worker = self._seated(rank)
            if worker is not None:
                if rank not in self.arrived:
                    log.info("machine %d arrived (worker %s)", rank, worker)
                self.arrived[rank] = worker
            elif rank in self.arrived and not self._done(rank):
                raise AttemptFailed(
                    f"machine {rank} (worker {self.arrived[rank]}) was lost mid-job: its worker "
                    "left before its ranks ended"
                )
            elif rank not in self.arrived and not self._done(rank):  # done between two polls
                missing.append(rank)
        waited = time.monotonic() - self.started
        if missing and waited > self.arrival_timeout:
            names = ", ".join(f"machine {rank}" for rank in missing)
            raise AttemptFailed(
                f"{names} of {self.machines} did not arrive within {self.arrival_timeout:g}s: no "
                "idle trainer worker took its share of the job (start one trainer worker per "
                "machine on the same queue and Redis, or lower dpo.num_machines)"
            )


def _send_shares(settings: TrainerSettings, shares: list[MachineShare]) -> None:
    from pairloop.train_client import make_train_client

    client = make_train_client(settings.redis_url, visibility_timeout=settings.visibility_timeout)
    try:
        for share in shares:
            client.send_task(
                TRAIN_RANK_TASK_NAME, args=[share.model_dump(mode="json")], queue=settings.queue
            )
    finally:
        client.close()


def _sending_first(
    settings: TrainerSettings, shares: list[MachineShare], watch: MachineWatch
) -> Callable[[], None]:
    """The attempt's watch, which first sends the shares: once the spec is written, so that a
    share never waits for it."""
    sent = False

    def check() -> None:
        nonlocal sent
        if not sent:
            _send_shares(settings, shares)
            sent = True
        watch.check()

    return check


def train_across_machines(
    spec: TrainingSpec,
    settings: TrainerSettings,
    *,
    report: Callable[[TrainProgress], None],
) -> TrainingOutcome:
    """The leader: train `spec` over `dpo.num_machines` machines, trying again when one is
    missing or lost (each try resumes from the last sharded checkpoint)."""
    machines = spec.job.hyperparameters.num_machines
    work = Path(spec.checkpoints_dir).parent
    failures: list[str] = []
    for number in range(1, settings.machine_attempts + 1):
        attempt = renew_attempt(work)
        if number > 1:  # the failed try may have been killed mid-save
            remove_incomplete_checkpoints(Path(spec.checkpoints_dir))
        shutil.rmtree(work / MACHINES_DIR, ignore_errors=True)
        (work / MACHINES_DIR).mkdir(parents=True)
        endpoint = f"{settings.advertise_address}:{settings.rendezvous_port or free_port()}"
        watch = MachineWatch(
            work, attempt=attempt, machines=machines, arrival_timeout=settings.arrival_timeout_s
        )
        shares = [
            MachineShare(
                job_id=spec.job.job_id,
                attempt=attempt,
                machine_rank=rank,
                machines=machines,
                endpoint=endpoint,
            )
            for rank in range(1, machines)
        ]
        log.info(
            "job %s attempt %d/%d (%s): %d machines meet at %s",
            spec.job.job_id,
            number,
            settings.machine_attempts,
            attempt,
            machines,
            endpoint,
        )
        try:
            return run_attempt(
                spec,
                settings,
                report=report,
                attempt=attempt,
                rendezvous=Rendezvous(machines, 0, endpoint),
                watch=_sending_first(settings, shares, watch),
            )
        except AttemptFailed as exc:
            log.warning("job %s attempt %d failed: %s", spec.job.job_id, number, exc.message)
            failures.append(exc.message)
    listed = "; ".join(f"{i}) {m}" for i, m in enumerate(failures, 1))
    raise ServerError(
        f"training job {spec.job.job_id} on {machines} machines failed {len(failures)} "
        f"attempt(s): {listed}. Its sharded checkpoints are kept, so submitting it again resumes"
    )


@contextlib.contextmanager
def _seat(work: Path, share: MachineShare, worker: str) -> Iterator[bool]:
    """Hold the machine's seat for this attempt; yields False when another worker holds it."""
    path = seat_path(work, share.machine_rank)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # the attempt's directory is gone: the attempt ended
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        data = f"{share.attempt}\n{worker}\n".encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        yield True
    finally:
        os.close(fd)


def run_machine_share(share: MachineShare, settings: TrainerSettings, *, worker: str) -> str:
    """Machine k's side: run its ranks for `share` while its attempt leads the job.

    Returns what happened ("trained", "stale", "seat taken", "leader gone", "failed"); a share
    of an attempt that no longer holds the job's lock never starts a rank.
    """
    work = settings.jobs_root / share.job_id
    if job_lock_holder(work) != share.attempt:
        log.warning(
            "job %s: share of attempt %r is stale; not joining", share.job_id, share.attempt
        )
        return "stale"
    try:
        spec = TrainingSpec.model_validate_json((work / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return "stale"
    if spec.attempt != share.attempt:
        return "stale"
    with _seat(work, share, worker) as seated:
        if not seated:
            return "seat taken"
        # The ranks here watch this process, not the leader (its pid means nothing here).
        local = work / f"spec-machine{share.machine_rank}.json"
        atomic_write_text(
            local, spec.model_copy(update={"owner_pid": os.getpid()}).model_dump_json()
        )
        rendezvous = Rendezvous(share.machines, share.machine_rank, share.endpoint)
        argv = accelerate_command(local, settings=settings, spec=spec, rendezvous=rendezvous)
        log_path = work / f"accelerate-machine{share.machine_rank}.log"
        proc = LaunchedGroup(argv, log_path=log_path)
        outcome = "failed"
        try:
            proc.start()
            while proc.alive():
                if job_lock_holder(work) != share.attempt:
                    outcome = "leader gone"
                    break
                time.sleep(_POLL_SECONDS)
        finally:
            proc.stop()
        if outcome != "leader gone" and proc.returncode == 0:
            outcome = "trained"
            with contextlib.suppress(OSError):  # the leader may have published and cleaned up
                atomic_write_text(_done_path(work, share.machine_rank), share.attempt + "\n")
        log.info("job %s machine %d: %s", share.job_id, share.machine_rank, outcome)
        return outcome

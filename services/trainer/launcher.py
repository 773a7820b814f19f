"""Multi-process training: the worker runs `accelerate launch` and follows it until it exits.

Used when more than one CUDA device is visible (or `PAIRLOOP_TRAINER_LAUNCHER=accelerate`).
The command, which a user can also run by hand on a spec file:

    accelerate launch --config_file services/trainer/accelerate/multi_gpu.yaml \\
        --num_processes <GPUs> -m services.trainer.launch_entry <work dir>/spec.json

The child runs in its own process group: if the task is cancelled or hits its soft time limit,
the whole group is stopped, and the job's trainer checkpoints stay for the next submission. If
the task's process is killed outright (hard time limit, `kill -9`), every rank notices within
seconds that its owner is gone and exits, so no orphan keeps the GPUs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

import pairloop.errors as errors
from pairloop.atomic import atomic_write_text
from pairloop.errors import PairloopError, ServerError
from pairloop.jobs import TrainProgress
from services.trainer.dpo import resolve_precision
from services.trainer.launch_entry import ERROR_FILE, OUTCOME_FILE, PROGRESS_FILE
from services.trainer.process_group import LaunchedGroup, free_port
from services.trainer.settings import TrainerSettings
from services.trainer.spec import TrainingOutcome, TrainingSpec, attempt_id, job_lock_holder

__all__ = [
    "SPEC_FILE",
    "Rendezvous",
    "accelerate_command",
    "join_training",
    "run_attempt",
    "same_network",
    "train_with_accelerate",
    "wait_for_current_spec",
]

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"

_POLL_SECONDS = 0.2


def _flag(value: bool) -> str:
    return "true" if value else "false"


@dataclass(frozen=True)
class Rendezvous:
    """Where this machine's ranks meet the others': machines, this one's rank, HOST:PORT."""

    machines: int = 1
    machine_rank: int = 0
    endpoint: str | None = None

    @classmethod
    def from_settings(cls, settings: TrainerSettings) -> Rendezvous:
        """The worker-level rendezvous (`python -m services.trainer.join` by hand)."""
        return cls(settings.num_machines, settings.machine_rank, settings.rendezvous_endpoint)


def same_network(config_file: Path) -> bool:
    """The accelerate config file's `same_network` (accelerate's CLI default would hide it)."""
    try:
        data = yaml.safe_load(config_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False  # accelerate itself reports an unreadable config file
    return isinstance(data, dict) and data.get("same_network") is True


def accelerate_command(
    spec_file: Path,
    *,
    settings: TrainerSettings,
    spec: TrainingSpec,
    rendezvous: Rendezvous | None = None,
) -> list[str]:
    """The `accelerate launch` argv for `spec_file` on this machine.

    `rendezvous` defaults to the worker's settings (`num_machines`, `machine_rank`,
    `rendezvous_endpoint`). The strategy's accelerate config file (multi_gpu / fsdp.yaml) carries
    the strategy; the flags carry what differs per job and per machine. Flags given on the command
    line win over the file's values (accelerate's `_validate_launch_command`), and a boolean flag
    left out counts as given false: `same_network` is passed when the file sets it.
    """
    rdzv = rendezvous or Rendezvous.from_settings(settings)
    argv = [sys.executable, "-m", "accelerate.commands.launch"]
    strategy = spec.strategy if spec.strategy != "single-process" else "ddp"
    config_file: Path | None = None
    if strategy != "ddp" or (spec.device == "cuda" and spec.world_size > 1):
        config_file = settings.accelerate_config_for(strategy)
        argv += ["--config_file", str(config_file)]
    else:
        # DDP on CPU ranks (a CPU host, the tests), or one process: no config file; several CPU
        # ranks run under torchrun (`--multi_gpu`) with the gloo backend.
        argv += ["--multi_gpu"] if spec.world_size > 1 else []
    if spec.device == "cpu":
        argv += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        argv += ["--num_cpu_threads_per_process", str(settings.cpu_threads or 1)]
    hp = spec.job.hyperparameters
    if strategy == "fsdp":
        checkpointing = resolve_precision(hp, spec.device)[1]
        argv += ["--fsdp_offload_params", _flag(hp.cpu_offload)]
        argv += ["--fsdp_activation_checkpointing", _flag(checkpointing)]
    # --num_processes is the total over all machines; torchrun runs processes per machine.
    argv += ["--num_processes", str(spec.world_size), "--num_machines", str(rdzv.machines)]
    if rdzv.machines > 1:
        assert rdzv.endpoint is not None  # the settings validator / the leader sets it
        host, port = rdzv.endpoint.rsplit(":", 1)
        argv += ["--machine_rank", str(rdzv.machine_rank)]
        if config_file is not None and same_network(config_file):
            # accelerate then gives torchrun MASTER_ADDR/PORT, which only the static rendezvous
            # reads (c10d would get an empty endpoint): machine 0 hosts its store there.
            argv += ["--same_network", "--rdzv_backend", "static"]
        else:
            argv += ["--rdzv_backend", "c10d"]
        argv += ["--main_process_ip", host, "--main_process_port", port]
    elif rdzv.endpoint is not None:
        host, port = rdzv.endpoint.rsplit(":", 1)
        argv += ["--main_process_ip", host, "--main_process_port", port]
    else:
        argv += ["--main_process_port", str(free_port())]
    argv += ["-m", "services.trainer.launch_entry", str(spec_file)]
    return argv


def _typed_error(payload: dict[str, str]) -> PairloopError:
    cls = getattr(errors, payload.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, PairloopError)):
        cls = ServerError
    return cls(payload.get("message", "training failed"))


def train_with_accelerate(
    spec: TrainingSpec, settings: TrainerSettings, *, report: Callable[[TrainProgress], None]
) -> TrainingOutcome:
    """Run the job's training in `spec.world_size` ranks and return rank 0's outcome.

    With several machines set on the worker (`num_machines`), this is machine 0; the others join
    with `services.trainer.join`. A job's own `num_machines` goes through `fanout.py` instead.
    """
    return run_attempt(
        spec, settings, report=report, attempt=attempt_id(), rendezvous=None, watch=None
    )


def run_attempt(
    spec: TrainingSpec,
    settings: TrainerSettings,
    *,
    report: Callable[[TrainProgress], None],
    attempt: str,
    rendezvous: Rendezvous | None,
    watch: Callable[[], None] | None,
) -> TrainingOutcome:
    """Machine 0's side of one attempt: write the spec, launch the ranks, follow them.

    `attempt` is what this process wrote into the job's lock (machines joining check both
    match). `watch` runs between polls; what it raises stops the ranks and fails the attempt.
    """
    work = Path(spec.checkpoints_dir).parent
    for name in (PROGRESS_FILE, OUTCOME_FILE, ERROR_FILE):
        (work / name).unlink(missing_ok=True)
    spec_file = work / SPEC_FILE
    spec = spec.model_copy(update={"owner_pid": os.getpid(), "attempt": attempt})
    atomic_write_text(spec_file, spec.model_dump_json(indent=2) + "\n")
    argv = accelerate_command(spec_file, settings=settings, spec=spec, rendezvous=rendezvous)
    proc = LaunchedGroup(argv, log_path=work / "accelerate.log")
    follower = _ProgressFollower(work / PROGRESS_FILE, report)
    try:
        proc.start()
        while proc.alive():
            follower.poll()
            if watch is not None:
                watch()
            time.sleep(_POLL_SECONDS)
        follower.poll()
        if proc.returncode != 0 and watch is not None and not (work / ERROR_FILE).is_file():
            # A machine lost mid-job may end the ranks here before the watch saw it; a training
            # error (error.json) is the job's own and is not tried again.
            watch()
    finally:
        proc.stop()
        spec_file.unlink(missing_ok=True)  # an ended attempt leaves no spec to join
    if (work / ERROR_FILE).is_file():
        raise _typed_error(json.loads((work / ERROR_FILE).read_text()))
    if proc.returncode != 0 or not (work / OUTCOME_FILE).is_file():
        raise ServerError(
            f"`accelerate launch` exited with status {proc.returncode} and no result; its log "
            f"({proc.log_path}) ends with:\n{proc.log_tail(30)}"
        )
    return TrainingOutcome.model_validate_json((work / OUTCOME_FILE).read_text())


def wait_for_current_spec(work: Path, *, timeout: float) -> TrainingSpec:
    """Machine 0's spec for the attempt training the job now, waiting up to `timeout` seconds.

    A `spec.json` counts only while the attempt that wrote it holds the job's lock: one left by
    an earlier attempt (its worker killed) is ignored until the next attempt replaces it.
    """
    shared = work / SPEC_FILE
    deadline = time.monotonic() + timeout
    ignored: str | None = None
    while True:
        try:
            spec = TrainingSpec.model_validate_json(shared.read_text())
        except FileNotFoundError:
            spec = None
        if spec is not None:
            holder = job_lock_holder(work)
            if spec.attempt is not None and holder == spec.attempt:
                return spec
            if ignored != spec.attempt:
                ignored = spec.attempt
                log.warning(
                    "ignoring %s: written by attempt %r, but the job's lock is held by %s",
                    shared,
                    spec.attempt,
                    repr(holder) if holder else "nobody",
                )
        if time.monotonic() > deadline:
            raise ServerError(
                f"no training spec of a running attempt appeared at {shared} within "
                f"{timeout:g}s{' (one left by an earlier attempt was ignored)' if ignored else ''}"
                ": is machine 0's trainer worker running this job, on the same shared model store?"
            )
        time.sleep(_POLL_SECONDS)


def join_training(work: Path, settings: TrainerSettings, *, timeout: float) -> int:
    """Machine k > 0: wait for machine 0's spec in the job's work directory, run this machine's
    ranks until training ends, and return their exit status (rank 0 reports the outcome)."""
    spec = wait_for_current_spec(work, timeout=timeout)
    # The ranks here watch this process, not machine 0's worker (its pid means nothing here).
    local = work / f"spec-machine{settings.machine_rank}.json"
    atomic_write_text(local, spec.model_copy(update={"owner_pid": os.getpid()}).model_dump_json())
    argv = accelerate_command(local, settings=settings, spec=spec)
    proc = LaunchedGroup(argv, log_path=work / f"accelerate-machine{settings.machine_rank}.log")
    try:
        proc.start()
        while proc.alive():
            time.sleep(_POLL_SECONDS)
    finally:
        proc.stop()
    return proc.returncode if proc.returncode is not None else 1


class _ProgressFollower:
    """Forwards each complete line appended to the ranks' progress file, once, in order."""

    def __init__(self, path: Path, report: Callable[[TrainProgress], None]) -> None:
        self.path = path
        self.report = report
        self.offset = 0

    def poll(self) -> None:
        """Forward new lines; never raises: following progress must not stop the training."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            if not line.strip():
                continue
            try:
                self.report(TrainProgress.model_validate_json(line))
            except Exception as exc:  # the report is the task's; training goes on regardless
                log.warning("progress line not forwarded (%s: %s)", type(exc).__name__, exc)

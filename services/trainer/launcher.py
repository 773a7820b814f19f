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
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pairloop.errors as errors
from pairloop.atomic import atomic_write_text
from pairloop.errors import PairloopError, ServerError
from pairloop.jobs import TrainProgress
from services.trainer.launch_entry import ERROR_FILE, OUTCOME_FILE, PROGRESS_FILE
from services.trainer.process_group import LaunchedGroup, free_port
from services.trainer.settings import TrainerSettings
from services.trainer.spec import TrainingOutcome, TrainingSpec

__all__ = ["accelerate_command", "train_with_accelerate"]

_POLL_SECONDS = 0.2


def accelerate_command(
    spec_file: Path, *, settings: TrainerSettings, processes: int, device: str
) -> list[str]:
    """The `accelerate launch` argv for `spec_file`."""
    argv = [sys.executable, "-m", "accelerate.commands.launch"]
    if device == "cuda" and processes > 1:
        argv += ["--config_file", str(settings.accelerate_config)]
    else:
        # One process, or CPU ranks (a CPU host, the tests): no config file; several CPU ranks
        # run under torchrun (`--multi_gpu`) with the gloo backend.
        argv += ["--multi_gpu"] if processes > 1 else []
        argv += ["--mixed_precision", "no", "--dynamo_backend", "no", "--num_machines", "1"]
        if device == "cpu":
            threads = settings.cpu_threads or 1
            argv += ["--num_cpu_threads_per_process", str(threads)]
    argv += ["--num_processes", str(processes), "--main_process_port", str(free_port())]
    argv += ["-m", "services.trainer.launch_entry", str(spec_file)]
    return argv


def _typed_error(payload: dict[str, str]) -> PairloopError:
    cls = getattr(errors, payload.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, PairloopError)):
        cls = ServerError
    return cls(payload.get("message", "training failed"))


def train_with_accelerate(
    spec: TrainingSpec,
    settings: TrainerSettings,
    *,
    processes: int,
    report: Callable[[TrainProgress], None],
) -> TrainingOutcome:
    """Run the job's training in `processes` ranks and return rank 0's outcome."""
    work = Path(spec.checkpoints_dir).parent
    for name in (PROGRESS_FILE, OUTCOME_FILE, ERROR_FILE):
        (work / name).unlink(missing_ok=True)
    spec_file = work / "spec.json"
    spec = spec.model_copy(update={"owner_pid": os.getpid()})
    atomic_write_text(spec_file, spec.model_dump_json(indent=2) + "\n")
    argv = accelerate_command(spec_file, settings=settings, processes=processes, device=spec.device)
    proc = LaunchedGroup(argv, log_path=work / "accelerate.log")
    follower = _ProgressFollower(work / PROGRESS_FILE, report)
    try:
        proc.start()
        while proc.alive():
            follower.poll()
            time.sleep(_POLL_SECONDS)
        follower.poll()
    finally:
        proc.stop()
    if (work / ERROR_FILE).is_file():
        raise _typed_error(json.loads((work / ERROR_FILE).read_text()))
    if proc.returncode != 0 or not (work / OUTCOME_FILE).is_file():
        raise ServerError(
            f"`accelerate launch` exited with status {proc.returncode} and no result; its log "
            f"({proc.log_path}) ends with:\n{proc.log_tail(30)}"
        )
    return TrainingOutcome.model_validate_json((work / OUTCOME_FILE).read_text())


class _ProgressFollower:
    """Forwards each complete line appended to the ranks' progress file, once, in order."""

    def __init__(self, path: Path, report: Callable[[TrainProgress], None]) -> None:
        self.path = path
        self.report = report
        self.offset = 0

    def poll(self) -> None:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            if line.strip():
                self.report(TrainProgress.model_validate_json(line))

"""What every rank of `accelerate launch` runs: train one job from a spec file written by the worker.

    accelerate launch --config_file services/trainer/accelerate/multi_gpu.yaml \\
        --num_processes 8 -m services.trainer.launch_entry WORK_DIR/spec.json

The worker (`launcher.py`) writes `spec.json` (a `TrainingSpec`), starts this command and
follows `progress.json`; rank 0 writes `outcome.json` (a `TrainingOutcome`) on success, or
`error.json` (the typed error's class name and message) on failure, so the worker can fail the
task with the same clear message it would give in-process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from pairloop.atomic import atomic_write_json
from pairloop.errors import PairloopError
from pairloop.jobs import TrainProgress
from pairloop.logs import configure_logging
from services.trainer.dpo import train_policy
from services.trainer.sharding import fsdp_on_cpu, return_freed_memory_to_the_os
from services.trainer.spec import TrainingSpec

__all__ = ["ERROR_FILE", "OUTCOME_FILE", "PROGRESS_FILE", "main"]

PROGRESS_FILE = "progress.jsonl"
OUTCOME_FILE = "outcome.json"
ERROR_FILE = "error.json"

log = logging.getLogger(__name__)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.trainer.launch_entry",
        description="Train one DPO job from a spec file (run by `accelerate launch`).",
    )
    parser.add_argument("spec", type=Path, help="TrainingSpec JSON written by the trainer worker")
    return parser


def _exit_when_gone(owner_pid: int, *, interval: float = 0.25) -> None:
    """Exit this rank when the worker process that launched it has died (it may be SIGKILLed)."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            try:
                os.kill(owner_pid, 0)
            except ProcessLookupError:
                log.error("the trainer task (pid %d) is gone; stopping this rank", owner_pid)
                os._exit(3)
            except PermissionError:
                continue  # the pid exists (signalling it is not allowed): still alive

    threading.Thread(target=watch, name="owner-watchdog", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    configure_logging("trainer-rank")
    from accelerate import PartialState

    spec = TrainingSpec.model_validate_json(args.spec.read_text())
    work = args.spec.parent
    if spec.owner_pid is not None:
        _exit_when_gone(spec.owner_pid)
    is_main = PartialState().is_main_process

    def report(progress: TrainProgress) -> None:
        # One JSON line per event, appended: the worker forwards every one, in order.
        if is_main:
            with (work / PROGRESS_FILE).open("a") as fh:
                fh.write(progress.model_dump_json() + "\n")

    if spec.device == "cpu":
        return_freed_memory_to_the_os()
    sharding = fsdp_on_cpu() if spec.device == "cpu" and spec.strategy == "fsdp" else nullcontext()
    try:
        with sharding:
            outcome = train_policy(spec, report)
    except PairloopError as exc:
        if is_main:
            atomic_write_json(
                work / ERROR_FILE, {"type": type(exc).__name__, "message": exc.message}
            )
        log.error("training failed: %s", exc.message)
        return 1
    if is_main:
        atomic_write_json(work / OUTCOME_FILE, json.loads(outcome.model_dump_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

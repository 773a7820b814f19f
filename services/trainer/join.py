"""Join a multi-machine training job from a machine other than machine 0, by hand.

A job's own `dpo.num_machines` is spread by the system (`fanout.py`): no command per machine.
This stays for debugging a rendezvous, with the worker-level settings below.

    PAIRLOOP_TRAINER_NUM_MACHINES=2 PAIRLOOP_TRAINER_MACHINE_RANK=1 \\
    PAIRLOOP_TRAINER_RENDEZVOUS_ENDPOINT=10.0.0.1:29500 PAIRLOOP_TRAINER_MODEL_STORE_ROOT=/models \\
        python -m services.trainer.join JOB_ID

Machine 0 runs the Celery worker that took the job: it writes the job's spec into the job's work
directory on the shared model store and starts its ranks. Every other machine runs this command
with its own `machine_rank`: it waits for that spec, starts this machine's ranks with the same
`accelerate launch` command (torchrun's c10d rendezvous at `rendezvous_endpoint`), and exits
with their status once training ends. Global rank 0 writes progress and the outcome into the
shared work directory, and machine 0's worker validates and publishes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pairloop.errors import PairloopError
from pairloop.logs import configure_logging
from services.trainer.launcher import join_training
from services.trainer.settings import TrainerSettings

__all__ = ["main", "make_parser"]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.trainer.join",
        description="Run this machine's ranks of a multi-machine DPO job (machine_rank > 0).",
    )
    parser.add_argument("job_id", help="the job's id (RUN_ID-iterK), as machine 0's worker runs it")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for machine 0's spec"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    configure_logging("trainer-join")
    settings = TrainerSettings()
    if settings.machine_rank == 0:
        sys.stderr.write("machine_rank is 0: machine 0 is the trainer worker, not a joiner\n")
        return 2
    try:
        return join_training(settings.jobs_root / args.job_id, settings, timeout=args.timeout)
    except PairloopError as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())

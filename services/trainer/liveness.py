"""The trainer worker's liveness check: its heartbeat file is fresh. No broker involved.

    python -m services.trainer.liveness        # exit 0: alive; 1: one line on stderr says why

The worker's main process touches `PAIRLOOP_TRAINER_HEARTBEAT_FILE` every
`PAIRLOOP_TRAINER_HEARTBEAT_INTERVAL_S` seconds (`celery_app.HeartbeatFile`); older than
`PAIRLOOP_TRAINER_HEARTBEAT_MAX_AGE_S` means the process is gone or wedged. A check through Redis
(`celery inspect ping`) would fail during a Redis outage and get a worker that is training
restarted; Celery reconnects to the broker on its own, however long the outage.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from services.trainer.settings import TrainerSettings

__all__ = ["heartbeat_age", "main"]


def heartbeat_age(settings: TrainerSettings) -> float | None:
    """Seconds since the worker last touched its heartbeat file; None if there is none."""
    try:
        return max(time.time() - settings.heartbeat_file.stat().st_mtime, 0.0)
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m services.trainer.liveness",
        description="Exit 0 while the trainer worker's heartbeat file is fresh (a liveness probe).",
    ).parse_args(argv)
    settings = TrainerSettings()
    age = heartbeat_age(settings)
    if age is None:
        sys.stderr.write(
            f"no heartbeat file at {settings.heartbeat_file}: is the worker running?\n"
        )
        return 1
    if age > settings.heartbeat_max_age_s:
        sys.stderr.write(
            f"heartbeat file {settings.heartbeat_file} is {age:.0f}s old (limit "
            f"{settings.heartbeat_max_age_s:g}s): the worker process is gone or wedged\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

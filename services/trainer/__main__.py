"""Start a trainer worker with flags: `python -m services.trainer --help` lists every setting.

    python -m services.trainer --model-store-root /models --soft-time-limit 36000 --hard-time-limit 37000

Each flag is also an environment variable (`--model-store-root` = PAIRLOOP_TRAINER_MODEL_STORE_ROOT).
The flags are validated here, then handed to the canonical worker command through the environment:

    celery -A services.trainer.celery_app worker --without-gossip --without-mingle --without-heartbeat

This is the one place that command is written: compose, Kubernetes and the local stack
(`pairloop run --local`, `pairloop demo`) all start a worker as `python -m services.trainer`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pairloop.settings import load_settings
from services.trainer.settings import TrainerSettings

__all__ = ["main", "worker_argv", "worker_env"]


def worker_argv(settings: TrainerSettings) -> list[str]:
    """The `celery worker` command for `settings` (pool and concurrency come from the app config)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "services.trainer.celery_app",
        "worker",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel",
        settings.log_level,
        "--hostname",
        settings.hostname,
    ]


def worker_env(settings: TrainerSettings, base: dict[str, str]) -> dict[str, str]:
    """`base` plus every setting as its PAIRLOOP_TRAINER_* variable, for the worker process."""
    env = dict(base)
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"PAIRLOOP_TRAINER_{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
    return env


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(TrainerSettings, argv)
    argv_worker = worker_argv(settings)
    os.execvpe(argv_worker[0], argv_worker, worker_env(settings, dict(os.environ)))
    return 0  # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(main())

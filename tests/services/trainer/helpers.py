"""Helpers for the trainer tests: jobs on the test model store, real workers, waiting on tasks.

Workers are real `celery -A services.trainer.celery_app worker` processes started through
`pairloop_local.processes.ManagedProcess`; waiting is polling a task's state with a deadline.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pairloop.jobs import TrainJob, TrainProgress
from pairloop.preference_data import make_preference_row
from pairloop.train_client import make_train_client, read_train_state, submit_train_job
from pairloop_local.processes import ManagedProcess, ProcessFailedError

REPO_ROOT = Path(__file__).resolve().parents[3]
# Small enough to train in seconds on two shared cores, big enough for a few real steps.
FAST_HYPERPARAMETERS: dict[str, Any] = {
    "max_steps": 8,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-3,
    "beta": 0.1,
    "save_steps": 4,
    "max_length": 128,
    "max_prompt_length": 64,
}


def preference_rows(n: int) -> list[dict[str, Any]]:
    """`n` Snorkel-format pairs: a specific answer beats a curt one."""
    return [
        make_preference_row(
            prompt_id=f"p{i}",
            prompt=f"Write a short poem about the number {i}.",
            responses=[f"The sea is blue, and {i} waves roll in.", "no", "Paris."],
            scores=[0.9, -1.0, 0.1],
            chosen_index=0,
            rejected_index=1,
        )
        for i in range(n)
    ]


def make_job(run_id: str, **overrides: Any) -> TrainJob:
    """A fast job on the store's `base` model and `data/pairs`, publishing to `out/<run_id>`."""
    fields: dict[str, Any] = {
        "run_id": run_id,
        "iteration": 1,
        "policy_path": "base",
        "reference_path": "base",
        "dataset_path": "data/pairs",
        "output_path": f"out/{run_id}",
        "hyperparameters": dict(FAST_HYPERPARAMETERS),
    }
    fields.update(overrides)
    return TrainJob.model_validate(fields)


@dataclass
class Worker:
    """A running trainer worker and a Celery client on the same Redis."""

    process: ManagedProcess
    redis_url: str
    client: Any = field(repr=False)

    def submit(self, job: TrainJob) -> Any:
        return submit_train_job(self.client, job)

    def submit_raw(self, payload: Any, task_id: str) -> Any:
        from pairloop.jobs import TRAIN_QUEUE, TRAIN_TASK_NAME

        return self.client.send_task(
            TRAIN_TASK_NAME, args=[payload], task_id=task_id, queue=TRAIN_QUEUE
        )


def start_worker(
    *, redis_url: str, store: Path, log_path: Path, env_extra: dict[str, str] | None = None
) -> Worker:
    """Start `celery ... worker` and wait (with a deadline) until it answers a control ping."""
    import os

    env = dict(os.environ)
    env.update(
        {
            "PAIRLOOP_REDIS_URL": redis_url,
            "PAIRLOOP_TRAINER_MODEL_STORE_ROOT": str(store),
            "PAIRLOOP_TRAINER_SOFT_TIME_LIMIT": "300",
            "PAIRLOOP_TRAINER_HARD_TIME_LIMIT": "360",
            "PAIRLOOP_TRAINER_VISIBILITY_TIMEOUT": "3600",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            # The test host's two cores are shared: spinning OpenMP threads made steps 10x slower.
            "PAIRLOOP_TRAINER_CPU_THREADS": "1",
        }
    )
    env.update(env_extra or {})
    name = f"trainer-{uuid.uuid4().hex[:8]}@%h"
    argv = [sys.executable, "-m", "celery", "-A", "services.trainer.celery_app", "worker"]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    argv += ["--loglevel", "INFO", "--hostname", name]
    process = ManagedProcess("trainer-worker", argv, log_path=log_path, env=env, cwd=REPO_ROOT)
    process.start()
    client = make_train_client(redis_url, visibility_timeout=3600)
    deadline = time.monotonic() + 60
    while not client.control.ping(timeout=0.5):
        if not process.alive() or time.monotonic() > deadline:
            process.stop()
            raise ProcessFailedError(f"trainer worker did not start:\n{process.log_tail()}")
    return Worker(process=process, redis_url=redis_url, client=client)


@dataclass
class Observed:
    """Everything a client saw while waiting for one task."""

    final: Any
    progress: list[TrainProgress]
    states: list[str]


def wait_for_task(
    result: Any,
    *,
    timeout: float,
    worker: Worker | None = None,
    until: Callable[[TrainProgress], bool] | None = None,
) -> Observed:
    """Poll `result` until it is ready (or `until(progress)` holds); keep every distinct state."""
    deadline = time.monotonic() + timeout
    progress: list[TrainProgress] = []
    states: list[str] = []
    while time.monotonic() < deadline:
        snap = read_train_state(result)
        if not states or states[-1] != snap.state:
            states.append(snap.state)
        if snap.progress is not None and (not progress or progress[-1] != snap.progress):
            progress.append(snap.progress)
            if until is not None and until(snap.progress):
                return Observed(snap, progress, states)
        if snap.state in ("SUCCESS", "FAILURE"):
            return Observed(snap, progress, states)
        if worker is not None and not worker.process.alive():
            raise AssertionError(f"worker died:\n{worker.process.log_tail()}")
        time.sleep(0.02)
    tail = worker.process.log_tail() if worker else ""
    raise AssertionError(f"task {result.id} not done after {timeout}s (states {states})\n{tail}")


def published_weights(result: Any) -> dict[str, Any]:
    """Every tensor of the checkpoint a `TrainResult` published, by name."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for path in sorted(Path(result.checkpoint_path).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest absolute difference between two checkpoints' tensors (same names)."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

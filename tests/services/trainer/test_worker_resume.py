"""`kill -9` of a worker mid-training, a new worker, the same job again: it resumes, not restarts.

A watcher thread looks at the job's output path the whole time: whenever it exists, it must be
a complete, marked checkpoint (nothing half-written is ever visible there).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pairloop.checkpoints import COMPLETE_MARKER, compare_checkpoints, read_manifest

from .helpers import make_job, start_worker, wait_for_task

SAVE_STEPS = 3
MAX_STEPS = 40


class OutputWatcher(threading.Thread):
    """Polls a directory; records anything seen there that is not a complete published checkpoint."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop_event = threading.Event()
        self.violations: list[str] = []
        self.looks = 0

    def run(self) -> None:
        while not self.stop_event.wait(0.005):
            self.looks += 1
            if not self.path.exists():
                continue
            names = {p.name for p in self.path.iterdir()}
            needed = {COMPLETE_MARKER, "model.safetensors", "config.json", "tokenizer.json"}
            if not needed <= names:
                self.violations.append(f"incomplete output: {sorted(names)}")


@pytest.fixture
def isolated_redis(redis_url: str) -> str:
    """Database 1 of the session's Redis: the killed worker's unacked job stays away from others."""
    return redis_url.rsplit("/", 1)[0] + "/1"


@pytest.fixture
def watcher(model_store: Path) -> Iterator[OutputWatcher]:
    w = OutputWatcher(model_store / "out" / "resume")
    w.start()
    try:
        yield w
    finally:
        w.stop_event.set()
        w.join()


def test_killed_worker_job_resumes_from_its_last_checkpoint(
    isolated_redis: str, model_store: Path, tmp_path: Path, watcher: OutputWatcher
) -> None:
    job = make_job("resume")
    job.hyperparameters.max_steps = MAX_STEPS
    job.hyperparameters.save_steps = SAVE_STEPS
    output = model_store / "out" / "resume"
    checkpoints = model_store / ".pairloop-trainer" / job.job_id / "checkpoints"

    first = start_worker(redis_url=isolated_redis, store=model_store, log_path=tmp_path / "w1.log")
    try:
        # Wait on a condition, not a clock: a complete checkpoint has been reported.
        seen = wait_for_task(
            first.submit(job),
            timeout=240,
            worker=first,
            until=lambda p: p.checkpoint_step >= SAVE_STEPS,
        )
        assert seen.final.state == "PROGRESS", f"job ended before the kill: {seen.final}"
        first.process.kill()  # SIGKILL to the worker's whole process group
    finally:
        first.process.stop()
        first.client.close()

    killed_at = seen.progress[-1]
    assert killed_at.step < MAX_STEPS
    assert not output.exists()
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert saved and saved[-1] >= SAVE_STEPS

    second = start_worker(redis_url=isolated_redis, store=model_store, log_path=tmp_path / "w2.log")
    try:
        observed = wait_for_task(second.submit(job), timeout=240, worker=second)
    finally:
        second.process.stop()
        second.client.close()
    assert observed.final.state == "SUCCESS", observed.final.error
    result = observed.final.result

    # Resumed from a complete checkpoint at or after the one reported before the kill, not step 0.
    assert result.resumed_from_step >= killed_at.checkpoint_step >= SAVE_STEPS
    assert result.resumed_from_step % SAVE_STEPS == 0 and result.resumed_from_step < MAX_STEPS
    assert result.resumed_from_step in saved
    assert result.steps == MAX_STEPS
    resumed = [p for p in observed.progress if p.phase == "training"]
    assert resumed and all(p.resumed_from_step == result.resumed_from_step for p in resumed)
    assert min(p.step for p in resumed) >= result.resumed_from_step

    # A valid checkpoint at the output path, and nothing half-written was ever visible there.
    assert (output / COMPLETE_MARKER).is_file()
    assert compare_checkpoints(read_manifest(model_store / "base"), read_manifest(output)) == []
    assert watcher.looks > 100 and watcher.violations == []

"""Multi-machine jobs fanned out by the system: two real trainer workers on one host, each a
"machine" with one CPU rank, sharing one Redis queue and one model store.

A job with `dpo.num_machines: 2` goes to the queue like any other; the worker that takes it
leads, sends machine 1's share to the same queue, and the other worker takes it. Nobody runs
`services.trainer.join`. FSDP2 over gloo, so checkpoints are sharded (each machine writes its
own shard) and a retried attempt resumes from them.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pairloop.jobs import TrainJob, TrainResult
from services.trainer.runner import run_train_job
from services.trainer.settings import TrainerSettings

from .helpers import (
    Worker,
    make_job,
    max_diff,
    published_weights,
    start_worker,
    wait_for_task,
)

MAX_STEPS = 12
TOLERANCE = 1e-4
ARRIVAL_TIMEOUT_S = 20
ATTEMPTS = 2


def _job(run_id: str, *, machines: int = 2) -> TrainJob:
    job = make_job(run_id)
    hp = job.hyperparameters.model_copy(
        update={
            "max_steps": MAX_STEPS,
            "save_steps": 4,
            "per_device_train_batch_size": 1,
            "global_batch_size": 4,
            "strategy": "fsdp",
            "num_machines": machines,
        }
    )
    return job.model_copy(update={"hyperparameters": hp})


@dataclass
class Machines:
    """Two trainer workers, one per "machine"; a killed one can be started again."""

    workers: list[Worker]
    redis_url: str
    store: Path
    logs: Path

    def start(self, index: int) -> Worker:
        env = {
            "PAIRLOOP_TRAINER_LAUNCHER": "accelerate",
            "PAIRLOOP_TRAINER_NUM_PROCESSES": "1",
            "PAIRLOOP_TRAINER_DEVICE": "cpu",
            "PAIRLOOP_TRAINER_ADVERTISE_ADDRESS": "127.0.0.1",
            "PAIRLOOP_TRAINER_ARRIVAL_TIMEOUT_S": str(ARRIVAL_TIMEOUT_S),
            "PAIRLOOP_TRAINER_MACHINE_ATTEMPTS": str(ATTEMPTS),
            "PAIRLOOP_TRAINER_HEARTBEAT_FILE": str(self.logs / f"heartbeat-{index}"),
        }
        log_path = self.logs / f"machine-{index}-{time.monotonic_ns()}.log"
        worker = start_worker(
            redis_url=self.redis_url, store=self.store, log_path=log_path, env_extra=env
        )
        self.workers[index] = worker
        return worker

    def holding(self, needle: str) -> int:
        """The index of the worker one of whose processes has `needle` on its command line."""
        for index, worker in enumerate(self.workers):
            root = psutil.Process(worker.process.pid)
            for proc in [root, *root.children(recursive=True)]:
                try:
                    if needle in " ".join(proc.cmdline()):
                        return index
                except psutil.Error:
                    continue
        raise AssertionError(f"no worker runs {needle}")

    def kill(self, index: int) -> None:
        """SIGKILL the worker and everything it started: its machine is gone."""
        root = psutil.Process(self.workers[index].process.pid)
        for proc in [*root.children(recursive=True), root]:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                continue
        psutil.wait_procs([root], timeout=10)
        self.workers[index].process.stop()


@pytest.fixture(scope="module")
def machines(
    redis_url: str, model_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Machines]:
    # A database of its own: shares and jobs left by other modules' workers never reach these.
    isolated = redis_url.rsplit("/", 1)[0] + "/3"
    pair = Machines([], isolated, model_store, tmp_path_factory.mktemp("machines"))
    pair.workers = [None, None]  # type: ignore[list-item]  # filled right below
    try:
        pair.start(0)
        pair.start(1)
        yield pair
    finally:
        for worker in pair.workers:
            if worker is not None:
                worker.process.stop()
                worker.client.close()


@pytest.fixture(scope="module")
def undisturbed(machines: Machines) -> TrainResult:
    """A 2-machine job through the system's fan-out, nothing disturbed."""
    observed = wait_for_task(machines.workers[0].submit(_job("fan-out")), timeout=300)
    assert observed.final.state == "SUCCESS", observed.final.error
    assert observed.final.result is not None
    progress = [p for p in observed.progress if p.phase == "training"]
    assert progress and all(p.machines == 2 and p.world_size == 2 for p in progress)
    return observed.final.result


def test_fan_out_trains_as_one_world_and_equals_one_machine_with_two_ranks(
    undisturbed: TrainResult, model_store: Path
) -> None:
    assert undisturbed.world_size == 2 and len(undisturbed.ranks) == 2
    assert all(r.policy_local_numel < r.policy_numel for r in undisturbed.ranks)  # sharded
    settings = TrainerSettings(
        model_store_root=model_store,
        redis_url="redis://unused:1/0",
        cpu_threads=1,
        launcher="accelerate",
        num_processes=2,
    )
    threads = torch.get_num_threads()
    try:
        one_machine = run_train_job(_job("one-machine", machines=1), settings)
    finally:
        torch.set_num_threads(threads)
    assert one_machine.world_size == 2
    base = load_file(str(model_store / "base" / "model.safetensors"))
    assert max_diff(published_weights(one_machine), base) > 1e-3  # training moved the weights
    assert max_diff(published_weights(undisturbed), published_weights(one_machine)) <= TOLERANCE


def test_multi_machine_job_resumes_after_a_machine_is_killed_and_restarted(
    machines: Machines, undisturbed: TrainResult
) -> None:
    job = _job("machine-lost")
    result = machines.workers[0].submit(job)

    def checkpointed(p: Any) -> bool:
        return p.phase == "training" and 4 <= p.checkpoint_step < MAX_STEPS

    seen = wait_for_task(result, timeout=240, until=checkpointed)
    assert seen.final.state == "PROGRESS", seen.final
    lost = machines.holding("spec-machine1.json")  # the worker running machine 1's ranks
    machines.kill(lost)
    machines.start(lost)  # within the leader's next attempt's arrival timeout
    observed = wait_for_task(result, timeout=300)
    assert observed.final.state == "SUCCESS", observed.final.error
    done = observed.final.result
    assert done is not None and done.resumed_from_step >= 4
    assert max_diff(published_weights(done), published_weights(undisturbed)) <= TOLERANCE


def test_multi_machine_job_fails_in_bounded_time_naming_the_missing_machine(
    machines: Machines,
) -> None:
    machines.workers[1].process.stop()  # one machine left: nobody takes machine 1's share
    started = time.monotonic()
    observed = wait_for_task(machines.workers[0].submit(_job("missing")), timeout=200)
    elapsed = time.monotonic() - started
    assert observed.final.state == "FAILURE"
    error = observed.final.error or ""
    assert f"machine 1 of 2 did not arrive within {ARRIVAL_TIMEOUT_S}s" in error, error
    assert f"failed {ATTEMPTS} attempt(s)" in error, error
    assert ATTEMPTS * ARRIVAL_TIMEOUT_S <= elapsed < ATTEMPTS * ARRIVAL_TIMEOUT_S + 60, elapsed

"""A joining machine uses machine 0's spec only while the attempt that wrote it holds the job's
lock: a `spec.json` left by an earlier, killed attempt is never joined."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pairloop.errors import ServerError
from services.trainer.fanout import MachineShare, run_machine_share, seat_path
from services.trainer.launcher import SPEC_FILE, join_training, wait_for_current_spec
from services.trainer.settings import TrainerSettings
from services.trainer.spec import LOCK_FILE, TrainingSpec, attempt_id, lock_holder

from .helpers import make_job


def _spec(work: Path, attempt: str) -> TrainingSpec:
    spec = TrainingSpec(
        job=make_job("join"),
        policy_path="/models/base",
        reference_path="/models/base",
        dataset_path="/models/data",
        dataset_cache=str(work / "cache"),
        checkpoints_dir=str(work / "checkpoints"),
        staging_dir=str(work / "staging"),
        device="cpu",
        strategy="ddp",
        world_size=2,
        attempt=attempt,
    )
    (work / SPEC_FILE).write_text(spec.model_dump_json())
    return spec


@pytest.fixture
def held_lock(tmp_path: Path) -> Iterator[Path]:
    """The job's lock held by this process, as machine 0's training attempt holds it."""
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, f"{attempt_id()}\n".encode(), 0)
    try:
        yield tmp_path
    finally:
        os.close(fd)


def test_a_spec_left_by_a_dead_attempt_is_never_joined(tmp_path: Path) -> None:
    # The earlier attempt's worker was killed: its spec and lock file stay, the lock is free.
    (tmp_path / LOCK_FILE).write_text("pid 4194300 on machine-0\n")
    _spec(tmp_path, "pid 4194300 on machine-0")
    settings = TrainerSettings(
        model_store_root=tmp_path,
        num_machines=2,
        machine_rank=1,
        rendezvous_endpoint="127.0.0.1:1",
        accelerate_config=tmp_path / "no-such-config.yaml",
    )
    with pytest.raises(ServerError) as info:
        join_training(tmp_path, settings, timeout=1.0)
    assert "earlier attempt was ignored" in info.value.message
    assert not (tmp_path / "accelerate-machine1.log").exists()  # no rank was started


def test_the_running_attempts_spec_is_joined_and_no_other(held_lock: Path) -> None:
    current = _spec(held_lock, attempt_id())
    assert wait_for_current_spec(held_lock, timeout=5.0) == current
    # The lock is held, but by another attempt than the one that wrote this spec.
    _spec(held_lock, "pid 1 on another-machine")
    with pytest.raises(ServerError):
        wait_for_current_spec(held_lock, timeout=0.5)


def test_a_fan_out_share_of_an_earlier_attempt_never_joins(held_lock: Path) -> None:
    """A machine's share sent for an earlier attempt (the leader has retried since) starts no rank,
    and neither does one whose attempt holds the lock but whose spec is another attempt's."""
    settings = TrainerSettings(
        model_store_root=held_lock, work_root=held_lock.parent, redis_url="redis://x:1/0"
    )
    current = attempt_id()
    _spec(held_lock, current)

    def share(attempt: str) -> MachineShare:
        return MachineShare(
            job_id=held_lock.name,
            attempt=attempt,
            machine_rank=1,
            machines=2,
            endpoint="127.0.0.1:1",
        )

    assert run_machine_share(share(f"{current} try old"), settings, worker="w") == "stale"
    _spec(held_lock, "pid 1 on another-machine")
    assert run_machine_share(share(current), settings, worker="w") == "stale"
    assert not (held_lock / "accelerate-machine1.log").exists()  # no rank was started
    assert lock_holder(seat_path(held_lock, 1)) is None  # and no seat taken

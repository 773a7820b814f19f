"""Sharded training on CPU: FSDP2 full shard over 2 gloo ranks through the real launch path.

What runs is production code end to end: `run_train_job` -> `accelerate launch --config_file
services/trainer/accelerate/fsdp.yaml` -> torchrun -> `launch_entry` -> TRL's DPOTrainer, with
accelerate's FSDP2 wrapping of the policy, TRL's sharding of the reference, the Trainer's sharded
checkpoints and a full state dict gathered by every rank for the published weights. The one
CPU-specific step is `sharding.fsdp_on_cpu` (accelerate enables its FSDP plugin only on GPU-like
devices); what the GPU adds (bf16 compute under FSDP's MixedPrecisionPolicy, NCCL, offload) is
covered by the GPU bench, not here.

Equality: a sharded run and a single process with the same global batch and seed publish the
same weights within 1e-4 (float32; the order of reductions is the only difference, and AdamW
normalises it up: measured 1.3e-7 after 8 steps, 1.4e-5 after 32 at lr 1e-3), while training
moved the weights by more than 1e-3.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pairloop.checkpoints import COMPLETE_MARKER, compare_checkpoints, read_manifest
from pairloop.jobs import TrainJob, TrainResult
from pairloop_local.processes import ManagedProcess, free_port
from services.trainer.runner import run_train_job
from services.trainer.settings import TrainerSettings

from .helpers import (
    REPO_ROOT,
    make_job,
    max_diff,
    published_weights,
    start_worker,
    wait_for_task,
)

# Long enough for the kill test to land mid-training: orphaned ranks notice their killed worker
# within 0.25 s (launch_entry's watchdog), a few tiny steps.
MAX_STEPS = 32
SAVE_STEPS = 4
TOLERANCE = 1e-4
_SINGLE = {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "global_batch_size": 4}


def _job(run_id: str, *, policy: str = "base", **hp: Any) -> TrainJob:
    job = make_job(run_id, policy_path=policy, reference_path=policy)
    return job.model_copy(
        update={"hyperparameters": job.hyperparameters.model_copy(update={**_SINGLE, **hp})}
    )


def _sharded_job(run_id: str, *, policy: str = "base", **hp: Any) -> TrainJob:
    # 2 ranks x 1 pair x accumulation 2 = the single process's 4 pairs per step: the recipe's
    # path, where micro-batches run under no_sync (unsharded gradients kept between them).
    return _job(run_id, policy=policy, per_device_train_batch_size=1, strategy="fsdp", **hp)


@pytest.fixture(scope="module")
def settings(model_store: Path) -> Iterator[TrainerSettings]:
    threads = torch.get_num_threads()
    yield TrainerSettings(
        model_store_root=model_store, redis_url="redis://unused:1/0", cpu_threads=1
    )
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bf16_policy(model_store: Path) -> str:
    """The tiny base stored in bfloat16, as Mistral-7B-Instruct ships."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = model_store / "base-bf16"
    if not out.is_dir():
        model = AutoModelForCausalLM.from_pretrained(model_store / "base", dtype=torch.bfloat16)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(model_store / "base").save_pretrained(out)
    return "base-bf16"


@pytest.fixture(scope="module")
def single(settings: TrainerSettings) -> TrainResult:
    """One process, 4 pairs per step: what the sharded runs must reproduce."""
    return run_train_job(_job("single"), settings)


@pytest.fixture(scope="module")
def sharded(settings: TrainerSettings) -> TrainResult:
    launched = settings.model_copy(
        update={"launcher": "accelerate", "num_processes": 2, "keep_checkpoints": True}
    )
    return run_train_job(_sharded_job("fsdp"), launched)


def test_each_rank_holds_only_its_shard_of_policy_and_reference(
    sharded: TrainResult, model_store: Path
) -> None:
    assert sharded.strategy == "fsdp" and sharded.world_size == 2
    assert sharded.gradient_accumulation_steps == 2 and sharded.global_batch_size == 4
    ranks = sharded.ranks
    assert [r.rank for r in ranks] == [0, 1]
    total = ranks[0].policy_numel
    n_params = len(read_manifest(Path(sharded.checkpoint_path)).tensors)
    for r in ranks:
        # Every parameter is a DTensor, and this rank stores about half of the elements.
        assert r.sharded_tensors == n_params
        assert 0.4 * total < r.policy_local_numel < 0.6 * total
        assert r.reference_local_numel is not None and r.reference_local_numel < 0.6 * total
    assert sum(r.policy_local_numel for r in ranks) == total
    assert sum(r.reference_local_numel or 0 for r in ranks) == total
    # The reference is sharded per decoder layer like the policy (TRL's own prepare_fsdp makes
    # it one unit: every forward would gather the whole model).
    layers = json.loads((model_store / "base" / "config.json").read_text())["num_hidden_layers"]
    assert all((r.reference_fsdp_units or 0) > layers for r in ranks)


def test_only_rank_0_reads_the_weights_and_the_reference_once(sharded: TrainResult) -> None:
    """Rank 0 materialises the policy and its reference copy (same checkpoint, read once); rank 1
    builds both empty and receives its shards by broadcast (the weights-equality test below
    proves the shards it received are rank 0's)."""
    rank0, rank1 = sharded.ranks
    assert rank0.loaded_numel == 2 * rank0.policy_numel
    assert rank1.loaded_numel == 0


def test_sharded_weights_equal_one_process_with_the_same_global_batch(
    sharded: TrainResult, single: TrainResult, model_store: Path
) -> None:
    assert sharded.steps == single.steps == MAX_STEPS
    base = load_file(str(model_store / "base" / "model.safetensors"))
    a, b = published_weights(sharded), published_weights(single)
    assert max_diff(a, b) <= TOLERANCE
    assert max_diff(b, base) > 10 * TOLERANCE  # training really moved the weights
    assert (Path(sharded.checkpoint_path) / COMPLETE_MARKER).is_file()


def test_crash_after_the_final_sharded_checkpoint_republishes_it(
    sharded: TrainResult, settings: TrainerSettings
) -> None:
    """Killed between the last checkpoint and the rename: the shards load into a sharded model,
    and the same weights are published without a step more."""
    output = Path(sharded.checkpoint_path)
    before = published_weights(sharded)
    shutil.rmtree(output)
    launched = settings.model_copy(update={"launcher": "accelerate", "num_processes": 2})
    again = run_train_job(_sharded_job("fsdp"), launched)
    assert again.resumed_from_step == again.steps == MAX_STEPS
    assert max_diff(published_weights(again), before) == 0.0


def test_two_machines_meet_at_one_rendezvous_and_publish_bf16_shards(
    settings: TrainerSettings, bf16_policy: str, model_store: Path, tmp_path: Path
) -> None:
    """Two launcher invocations (machine_rank 0 and 1, one process each), c10d on loopback."""
    endpoint = f"127.0.0.1:{free_port()}"
    machine = {
        "launcher": "accelerate",
        "num_processes": 1,
        "num_machines": 2,
        "rendezvous_endpoint": endpoint,
        "publish_max_shard_size": "100KB",  # the tiny model's 390 KB in bf16 -> several files
    }
    # Also FSDP's activation checkpointing, and the reference's log-probs precomputed by the
    # sharded reference before it is freed: neither changes the math.
    variant = {"gradient_checkpointing": True, "precompute_ref_log_probs": True}
    job = _sharded_job("two-machines", policy=bf16_policy, **variant)
    env = {
        **os.environ,
        "PAIRLOOP_TRAINER_MODEL_STORE_ROOT": str(model_store),
        "PAIRLOOP_REDIS_URL": "redis://unused:1/0",
        "PAIRLOOP_TRAINER_CPU_THREADS": "1",
        **{f"PAIRLOOP_TRAINER_{k.upper()}": str(v) for k, v in machine.items()},
        "PAIRLOOP_TRAINER_MACHINE_RANK": "1",
    }
    argv = [sys.executable, "-m", "services.trainer.join", job.job_id, "--timeout", "300"]
    joiner = ManagedProcess("machine1", argv, log_path=tmp_path / "m1.log", env=env, cwd=REPO_ROOT)
    joiner.start()
    try:
        result = run_train_job(job, settings.model_copy(update={**machine, "machine_rank": 0}))
        deadline = time.monotonic() + 60
        while joiner.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not joiner.alive() and joiner.proc is not None, joiner.log_tail()
        assert joiner.proc.returncode == 0, joiner.log_tail()
    finally:
        joiner.stop()
    assert result.world_size == 2 and len(result.ranks) == 2
    assert all(r.policy_local_numel < r.policy_numel for r in result.ranks)
    # Machine 1 read nothing: its policy and the reference that precomputed its log-probs came
    # by broadcast (a wrong reference there would change its log-probs, and the weights below).
    assert [r.loaded_numel for r in result.ranks] == [2 * result.ranks[0].policy_numel, 0]

    out = Path(result.checkpoint_path)
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    # What the generator's swap checks (names, shapes, dtype) against the running bf16 model.
    policy = read_manifest(model_store / bf16_policy)
    assert compare_checkpoints(policy, read_manifest(out)) == []
    assert {t.dtype for t in read_manifest(out).tensors.values()} == {"BF16"}

    # Same as one process on the same bf16 policy, to bf16 rounding (float32 master weights on
    # both sides; a near-tie can round either way: one bf16 step, 2^-8 relative).
    single = run_train_job(_job("single-bf16", policy=bf16_policy, **variant), settings)
    a, b = published_weights(result), published_weights(single)
    for name in a:
        gap = (a[name].float() - b[name].float()).abs()
        assert bool((gap <= b[name].float().abs() * 2**-7 + 1e-6).all()), name


def _rank_processes(spec_file: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(spec_file) in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_killed_sharded_job_resumes_and_publishes_the_uninterruptedpublished_weights(
    redis_url: str, model_store: Path, tmp_path: Path, sharded: TrainResult
) -> None:
    isolated = redis_url.rsplit("/", 1)[0] + "/2"  # the killed worker's unacked job stays here
    env = {
        "PAIRLOOP_TRAINER_LAUNCHER": "accelerate",
        "PAIRLOOP_TRAINER_NUM_PROCESSES": "2",
        "PAIRLOOP_TRAINER_STRATEGY": "fsdp",
    }
    job = _sharded_job("fsdp-killed")
    work = model_store / ".pairloop-trainer" / job.job_id
    first = start_worker(
        redis_url=isolated, store=model_store, log_path=tmp_path / "w1.log", env_extra=env
    )
    try:
        seen = wait_for_task(
            first.submit(job),
            timeout=240,
            worker=first,
            until=lambda p: p.checkpoint_step >= SAVE_STEPS,
        )
        assert seen.final.state == "PROGRESS", f"job ended before the kill: {seen.final}"
        first.process.kill()  # SIGKILL to the worker; its ranks see their owner gone and exit
    finally:
        first.process.stop()
        first.client.close()
    deadline = time.monotonic() + 30
    while _rank_processes(work / "spec.json") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _rank_processes(work / "spec.json"), "ranks outlived their killed worker"
    assert not (model_store / "out" / "fsdp-killed").exists()
    saved = sorted(int(p.name.split("-")[1]) for p in (work / "checkpoints").glob("checkpoint-*"))
    assert saved and saved[-1] < MAX_STEPS
    # A sharded checkpoint: one distributed-checkpoint directory for the model's shards.
    assert (work / "checkpoints" / f"checkpoint-{saved[-1]}" / "pytorch_model_fsdp_0").is_dir()

    second = start_worker(
        redis_url=isolated, store=model_store, log_path=tmp_path / "w2.log", env_extra=env
    )
    try:
        observed = wait_for_task(second.submit(job), timeout=240, worker=second)
    finally:
        second.process.stop()
        second.client.close()
    assert observed.final.state == "SUCCESS", observed.final.error
    resumed = observed.final.result
    assert SAVE_STEPS <= resumed.resumed_from_step < MAX_STEPS
    assert resumed.steps == MAX_STEPS and resumed.strategy == "fsdp"
    assert max_diff(published_weights(resumed), published_weights(sharded)) <= TOLERANCE

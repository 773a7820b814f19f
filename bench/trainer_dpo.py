"""DPO trainer on CPU: step throughput with and without precomputed reference log-probs, side by
side, and the whole Celery task's overhead as a share of its wall time.

    python -m bench.trainer_dpo                          # 100m preset, both parts (~5 min on 2 cores)
    python -m bench.trainer_dpo --steps 3 --repeats 1    # quicker
    python -m bench.trainer_dpo --skip-task              # step throughput only
    python -m bench.trainer_dpo --sharded                # part 3 only: FSDP vs DDP on 2 CPU ranks

Part 1 runs the production training code (`services.trainer.dpo.train_policy`) in this process on
a random ~100M-parameter Llama (`pairloop_local.tiny_models`, preset 100m), same data and settings for
both variants, alternating them `--repeats` times (the host is shared) and keeping the median
step. A step's time is the gap between two consecutive per-step progress reports (logging_steps
1), the first step excluded as warm-up, in wall time and in this process's CPU time (torch runs
single-threaded here, `--threads 1`, so CPU time is the step's cost even on a busy shared host). With precomputation the reference forward leaves the step
and runs once, before training, over the whole split: its cost is reported too, as the extra
load time, and folded into an effective samples/s for one epoch over `--pairs` pairs.

Part 2 starts a real Redis and a real worker (`celery -A services.trainer.celery_app worker`),
submits one job on the same model, and splits the client's wall time (submit -> result) into
queueing (until the task started), the task's own phases (`TrainResult.timings`) and the result's
trip back. Overhead = everything but the training steps. Figures are printed and written to
bench/results/trainer_dpo.json.

Part 3 (`--sharded`, its own results file trainer_dpo_sharded.json) runs whole jobs through
`run_train_job` on 2 CPU ranks (`accelerate launch`, gloo), strategy fsdp (FSDP2 full shard) and
ddp alternately, same model, data, seed and global batch (2 ranks x batch/2): samples/s from the
per-step progress reports (first step excluded) and each rank's peak and end-of-training RSS and
parameter elements held, from the job's own per-rank report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_VOCABULARY = (
    "the sea is blue because light scatters write a short poem about numbers explain how rainbows "
    "form give three tips for learning to cook python sorted list capital of france paris helpful "
    "assistant answers clearly and kindly summary first then finally example step data model"
)
_WORDS = _VOCABULARY.split()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="100m", help="pairloop_local.tiny_models preset")
    p.add_argument("--store", type=Path, help="model store to reuse (the model is built once)")
    p.add_argument("--pairs", type=int, default=64, help="pairs in the split")
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--response-words", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4, help="per-device batch (pairs per step)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run (after 1 warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each variant")
    p.add_argument(
        "--task-steps", type=int, default=8, help="optimizer steps of the task in part 2"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (PAIRLOOP_TRAINER_CPU_THREADS); 1 is steadiest on a shared host",
    )
    p.add_argument("--skip-task", action="store_true", help="skip part 2 (the Celery task)")
    p.add_argument(
        "--sharded", action="store_true", help="run only part 3: fsdp vs ddp on 2 CPU ranks"
    )
    p.add_argument("--tag", default="", help="suffix for the results file")
    return p


def _text(i: int, n: int) -> str:
    return " ".join(_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(n))


def build_store(root: Path, args: argparse.Namespace) -> Path:
    """The policy (= reference) model and a preference split, built once per store."""
    from pairloop.preference_data import make_preference_row, write_preference_split
    from pairloop_local.tiny_models import build_tiny_chat_model

    if not (root / "policy" / "config.json").is_file():
        build_tiny_chat_model(root / "policy", preset=args.preset)
    rows = [
        make_preference_row(
            prompt_id=f"p{i}",
            prompt=_text(i, args.prompt_words),
            responses=[_text(i + 1, args.response_words), _text(i + 2, args.response_words // 2)],
            scores=[1.0, 0.0],
            chosen_index=0,
            rejected_index=1,
        )
        for i in range(args.pairs)
    ]
    write_preference_split(root / "data", "train_iteration_1", rows)
    return root


def _hyperparameters(args: argparse.Namespace, *, precompute: bool, steps: int) -> dict[str, Any]:
    # Zephyr's DPO settings where they apply on CPU (beta, lr, schedule, optimizer); the batch is
    # smaller and there is no bf16 / gradient checkpointing (both "auto": off on CPU).
    return {
        "beta": 0.01,
        "learning_rate": 5e-7,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "save_steps": 10_000,
        "max_length": 1024,
        "max_prompt_length": 512,
        "precompute_ref_log_probs": precompute,
    }


def run_variant(store: Path, args: argparse.Namespace, *, precompute: bool) -> dict[str, Any]:
    """One in-process training run; per-step wall times from the progress reports."""
    from pairloop.jobs import TrainJob, TrainProgress
    from services.trainer.dpo import train_policy
    from services.trainer.spec import TrainingSpec

    work = Path(tempfile.mkdtemp(prefix="dpo-bench-", dir=store))
    job = TrainJob(
        run_id="bench",
        iteration=1,
        policy_path=str(store / "policy"),
        reference_path=str(store / "policy"),
        dataset_path=str(store / "data"),
        output_path=str(work / "out"),
        hyperparameters=_hyperparameters(args, precompute=precompute, steps=args.steps + 1),
    )
    spec = TrainingSpec(
        job=job,
        policy_path=job.policy_path,
        reference_path=job.reference_path,
        dataset_path=job.dataset_path,
        dataset_cache=str(work / "cache"),  # fresh: precomputed log-probs are not reused
        checkpoints_dir=str(work / "checkpoints"),
        staging_dir=str(work / "staging"),
        device="cpu",
        cpu_threads=args.threads,
    )
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    seen = [0]

    def report(progress: TrainProgress) -> None:
        # One stamp per new step: the report after a checkpoint save repeats the step.
        if progress.phase == "training" and progress.loss is not None and progress.step > seen[0]:
            seen[0] = progress.step
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())

    try:
        outcome = train_policy(spec, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    cpu = [b - a for a, b in itertools.pairwise(cpu_stamps)]
    return {"step_seconds": steps, "step_cpu_seconds": cpu, "load_seconds": outcome.timings["load"]}


def step_throughput(store: Path, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"reference_model": [], "precomputed": []}
    for _ in range(args.repeats):
        runs["reference_model"].append(run_variant(store, args, precompute=False))
        runs["precomputed"].append(run_variant(store, args, precompute=True))
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        step = statistics.median(s for r in rs for s in r["step_seconds"])
        cpu = statistics.median(s for r in rs for s in r["step_cpu_seconds"])
        out[name] = {
            "median_step_seconds": step,
            "samples_per_second": args.batch_size / step,
            # CPU time of this (single-threaded) process: what a step costs, whatever else
            # the shared host runs at the same time.
            "median_step_cpu_seconds": cpu,
            "samples_per_cpu_second": args.batch_size / cpu,
            "load_seconds": statistics.median(r["load_seconds"] for r in rs),
            "runs": rs,
        }
    ref, pre = out["reference_model"], out["precomputed"]
    out["step_speedup_cpu_time"] = pre["samples_per_cpu_second"] / ref["samples_per_cpu_second"]
    precompute_cost = max(pre["load_seconds"] - ref["load_seconds"], 0.0)
    epoch_ref = args.pairs / ref["samples_per_second"]
    epoch_pre = args.pairs / pre["samples_per_second"] + precompute_cost
    out["precompute_seconds"] = precompute_cost
    out["step_speedup"] = pre["samples_per_second"] / ref["samples_per_second"]
    out["epoch_samples_per_second"] = {
        "reference_model": args.pairs / epoch_ref,
        "precomputed": args.pairs / epoch_pre,
    }
    return out


def task_overhead(store: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One job through a real worker; where the client's wall time went."""
    from pairloop.jobs import TrainJob, TrainResult
    from pairloop.train_client import make_train_client, read_train_state, submit_train_job
    from pairloop_local.processes import ManagedProcess
    from pairloop_local.redis_server import start_redis

    redis = start_redis(Path(tempfile.mkdtemp(prefix="dpo-bench-redis-")))
    env = dict(os.environ)
    env.update(
        {
            "PAIRLOOP_REDIS_URL": redis.url,
            "PAIRLOOP_TRAINER_MODEL_STORE_ROOT": str(store),
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PAIRLOOP_TRAINER_CPU_THREADS": str(args.threads),
        }
    )
    argv = [sys.executable, "-m", "celery", "-A", "services.trainer.celery_app", "worker"]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"]
    worker = ManagedProcess("trainer", argv, log_path=store / "worker.log", env=env)
    client = make_train_client(redis.url)
    shutil.rmtree(store / "out", ignore_errors=True)
    job = TrainJob(
        run_id=f"bench{int(time.time())}",
        iteration=1,
        policy_path="policy",
        reference_path="policy",
        dataset_path="data",
        output_path="out",
        hyperparameters=_hyperparameters(args, precompute=False, steps=args.task_steps),
    )
    try:
        worker.start()
        while not client.control.ping(timeout=0.5):
            if not worker.alive():
                raise RuntimeError(worker.log_tail())
        sent = time.time()
        handle = submit_train_job(client, job)
        while read_train_state(handle).state not in ("SUCCESS", "FAILURE"):
            if not worker.alive():
                raise RuntimeError(worker.log_tail())
            time.sleep(0.05)
        done = time.time()
        state = read_train_state(handle)
        if state.result is None:
            raise RuntimeError(f"task failed: {state.error}")
        result: TrainResult = state.result
    finally:
        worker.stop()
        client.close()
        redis.stop()
    wall = done - sent
    queued = (result.started_at or sent) - sent
    returned = max(wall - queued - result.seconds, 0.0)
    train = result.timings["train"]
    return {
        "steps": result.steps,
        "wall_seconds": wall,
        "queued_seconds": queued,
        "task_timings": result.timings,
        "result_return_seconds": returned,
        "training_seconds": train,
        "overhead_seconds": wall - train,
        "overhead_share": (wall - train) / wall,
    }


def _sharded_job(store: Path, args: argparse.Namespace, strategy: str, i: int) -> dict[str, Any]:
    """One 2-rank job with `strategy`; step times from its progress reports, RSS from its ranks."""
    from pairloop.jobs import TrainJob, TrainProgress
    from services.trainer.runner import run_train_job
    from services.trainer.settings import TrainerSettings

    hp = _hyperparameters(args, precompute=False, steps=args.steps + 1)
    hp.update(strategy=strategy, per_device_train_batch_size=args.batch_size // 2)
    hp.update(global_batch_size=args.batch_size)
    job = TrainJob(
        run_id=f"bench-{strategy}-{i}-{int(time.time())}",
        iteration=1,
        policy_path="policy",
        reference_path="policy",
        dataset_path="data",
        output_path=f"out-{strategy}-{i}",
        hyperparameters=hp,
    )
    settings = TrainerSettings(
        model_store_root=store,
        redis_url="redis://unused:1/0",
        launcher="accelerate",
        num_processes=2,
        cpu_threads=args.threads,
    )
    stamps: list[float] = []
    seen = [0]

    def report(progress: TrainProgress) -> None:
        if progress.phase == "training" and progress.loss is not None and progress.step > seen[0]:
            seen[0] = progress.step
            stamps.append(time.perf_counter())

    result = run_train_job(job, settings, report=report)
    shutil.rmtree(store / job.output_path, ignore_errors=True)
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "step_seconds": steps,
        "ranks": [r.model_dump() for r in result.ranks],
        "global_batch_size": result.global_batch_size,
        "train_seconds": result.timings.get("train"),
        "job_seconds": result.seconds,
    }


def sharded_vs_ddp(store: Path, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"ddp": [], "fsdp": []}
    for i in range(args.repeats):
        for strategy in ("ddp", "fsdp"):
            runs[strategy].append(_sharded_job(store, args, strategy, i))
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        step = statistics.median(s for r in rs for s in r["step_seconds"])
        ranks = sorted({r["rank"] for run in rs for r in run["ranks"]})
        out[name] = {
            "median_step_seconds": step,
            "samples_per_second": args.batch_size / step,
            "peak_rss_gib_per_rank": [
                max(r["peak_rss_bytes"] for run in rs for r in run["ranks"] if r["rank"] == k)
                / 2**30
                for k in ranks
            ],
            "end_rss_gib_per_rank": [
                max(r["rss_bytes"] for run in rs for r in run["ranks"] if r["rank"] == k) / 2**30
                for k in ranks
            ],
            "policy_elements_per_rank": [
                rs[0]["ranks"][k]["policy_local_numel"] for k in range(len(ranks))
            ],
            "runs": rs,
        }
    out["fsdp_vs_ddp_samples_per_second"] = (
        out["fsdp"]["samples_per_second"] / out["ddp"]["samples_per_second"]
    )
    return out


def _print_sharded(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"2 CPU ranks, global batch {args.batch_size} ({args.batch_size // 2} per rank):")
    for name in ("ddp", "fsdp"):
        r = result[name]
        peak = ", ".join(f"{x:.2f}" for x in r["peak_rss_gib_per_rank"])
        end = ", ".join(f"{x:.2f}" for x in r["end_rss_gib_per_rank"])
        held = ", ".join(f"{x / 1e6:.1f}M" for x in r["policy_elements_per_rank"])
        print(
            f"  {name:5s} step {r['median_step_seconds']:.2f}s  {r['samples_per_second']:.2f} "
            f"samples/s  peak RSS per rank [{peak}] GiB, at the end [{end}] GiB, policy "
            f"elements held per rank [{held}]"
        )
    print(f"  fsdp / ddp samples/s: {result['fsdp_vs_ddp_samples_per_second']:.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    import torch

    from pairloop.logs import configure_logging

    configure_logging("bench", "WARNING")
    store = args.store or Path(tempfile.mkdtemp(prefix="dpo-bench-store-"))
    build_store(store, args)
    from pairloop.checkpoints import read_manifest

    params = read_manifest(store / "policy").num_parameters
    print(f"model: {args.preset} preset, {params / 1e6:.1f}M parameters; {args.pairs} pairs")
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
    }
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.sharded:
        sharded = sharded_vs_ddp(store, args)
        _print_sharded(sharded, args)
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = "trainer_dpo_sharded" + (f"_{args.tag}" if args.tag else "")
        header = {"bench": name, "machine": machine, "config": config, "parameters": params}
        (RESULTS / f"{name}.json").write_text(json.dumps({**header, **sharded}, indent=2) + "\n")
        print(f"written: {RESULTS / name}.json")
        if args.store is None:
            shutil.rmtree(store, ignore_errors=True)
        return 0
    steps = step_throughput(store, args)
    for name in ("reference_model", "precomputed"):
        s = steps[name]
        print(
            f"  {name:16s} step {s['median_step_seconds']:.2f}s wall, "
            f"{s['median_step_cpu_seconds']:.2f}s CPU  {s['samples_per_second']:.2f} samples/s "
            f"({s['samples_per_cpu_second']:.2f} per CPU-second)  (load {s['load_seconds']:.1f}s)"
        )
    print(
        f"  step speed-up with precomputed log-probs: {steps['step_speedup']:.2f}x wall, "
        f"{steps['step_speedup_cpu_time']:.2f}x CPU time; precompute "
        f"costs {steps['precompute_seconds']:.1f}s for {args.pairs} pairs; one-epoch samples/s "
        f"{steps['epoch_samples_per_second']['reference_model']:.2f} -> "
        f"{steps['epoch_samples_per_second']['precomputed']:.2f}"
    )
    report: dict[str, Any] = {
        "bench": "trainer_dpo",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": params,
        "step_throughput": steps,
    }
    if not args.skip_task:
        task = task_overhead(store, args)
        report["task"] = task
        t = task["task_timings"]
        print(
            f"task: {task['steps']} steps, wall {task['wall_seconds']:.1f}s = queued "
            f"{task['queued_seconds']:.1f} + prepare {t['prepare']:.1f} + startup "
            f"{t['startup']:.1f} + load {t['load']:.1f} + train {t['train']:.1f} + save "
            f"{t['save']:.1f} + validate {t['validate']:.1f} + publish {t['publish']:.1f} + "
            f"return {task['result_return_seconds']:.1f}"
        )
        print(
            f"  overhead {task['overhead_seconds']:.1f}s = {100 * task['overhead_share']:.0f}% "
            "of the wall time"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "trainer_dpo" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {RESULTS / name}.json")
    if args.store is None:
        shutil.rmtree(store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

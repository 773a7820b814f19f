"""Trainer host memory on CPU ranks: FSDP against DDP, measured, and the plan's prediction.

    python -m bench.trainer_memory                 # 77M model, 2 ranks, accumulation 2 (~5 min)
    python -m bench.trainer_memory --steps 2       # quicker

Runs two whole jobs through the production path (`run_train_job` -> `accelerate launch` with 2
gloo ranks -> TRL's DPOTrainer), one with strategy fsdp and one with ddp, on the same random
~77M-parameter Llama (`pairloop_local.tiny_models`, preset 100m), data, seed and global batch
(2 ranks x 1 pair x gradient accumulation 2). Each rank reports its peak resident memory
(`ru_maxrss`, over its whole life: load, training, save); the figure per strategy is the largest
over its ranks (rank 0, which reads the weights, under FSDP). Beside them: the plan's prediction
for the same shape on CPU ranks (`orchestrator.plan.trainer_host_memory`, device "cpu": the
training state is host memory there), and the RSS of a process that has only imported the
trainer's stack (the runtime every rank carries before any model). Prompts and answers are long
enough that every sequence is cut to `max_length`, so the plan's token count is the real one.

Writes bench/results/trainer_memory.json: fsdp_peak_rss_bytes, ddp_peak_rss_bytes,
plan_fsdp_peak_bytes, and the per-rank and per-phase figures behind them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1 << 30
_VOCABULARY = (
    "the sea is blue because light scatters write a short poem about numbers explain how rainbows "
    "form give three tips for learning to cook python sorted list capital of france paris helpful"
)
_WORDS = _VOCABULARY.split()
# The runtime a rank carries before any model: what `launch_entry` imports.
_RUNTIME_PROBE = (
    "import resource, services.trainer.launch_entry, services.trainer.dpo, trl, accelerate; "
    "from trl import DPOTrainer; "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="100m", help="pairloop_local.tiny_models preset")
    p.add_argument("--pairs", type=int, default=32, help="pairs in the split")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per job")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument(
        "--only", choices=["fsdp", "ddp"], help="run one strategy (no comparison, no results file)"
    )
    return p


def _text(i: int, n: int) -> str:
    return " ".join(_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(n))


def build_store(root: Path, args: argparse.Namespace) -> Path:
    from pairloop.preference_data import make_preference_row, write_preference_split
    from pairloop_local.tiny_models import build_tiny_chat_model

    build_tiny_chat_model(root / "policy", preset=args.preset)
    # Long enough to fill max_length after truncation: every micro-batch has the planned tokens.
    words = args.max_length
    rows = [
        make_preference_row(
            prompt_id=f"p{i}",
            prompt=_text(i, words),
            responses=[_text(i + 1, words), _text(i + 2, words)],
            scores=[1.0, 0.0],
            chosen_index=0,
            rejected_index=1,
        )
        for i in range(args.pairs)
    ]
    write_preference_split(root / "data", "train_iteration_1", rows)
    return root


def _hyperparameters(args: argparse.Namespace, strategy: str) -> dict[str, Any]:
    return {
        "beta": 0.01,
        "learning_rate": 5e-7,
        "per_device_train_batch_size": 1,
        "global_batch_size": 4,  # 2 ranks x 1 pair x accumulation 2
        "max_steps": args.steps,
        "save_steps": 10_000,  # no resume checkpoint: the published save is measured
        "max_length": args.max_length,
        "max_prompt_length": args.max_length // 2,
        "strategy": strategy,
    }


def run_job(store: Path, args: argparse.Namespace, strategy: str) -> dict[str, Any]:
    from pairloop.jobs import TrainJob
    from services.trainer.runner import run_train_job
    from services.trainer.settings import TrainerSettings

    job = TrainJob(
        run_id=f"mem-{strategy}-{int(time.time())}",
        iteration=1,
        policy_path="policy",
        reference_path="policy",
        dataset_path="data",
        output_path=f"out-{strategy}",
        hyperparameters=_hyperparameters(args, strategy),
    )
    settings = TrainerSettings(
        model_store_root=store,
        redis_url="redis://unused:1/0",
        launcher="accelerate",
        num_processes=2,
        cpu_threads=args.threads,
    )
    started = time.monotonic()
    result = run_train_job(job, settings)
    shutil.rmtree(store / job.output_path, ignore_errors=True)
    return {
        "seconds": time.monotonic() - started,
        "gradient_accumulation_steps": result.gradient_accumulation_steps,
        "ranks": [r.model_dump() for r in result.ranks],
        "timings": result.timings,
    }


def runtime_rss() -> int:
    """Peak RSS of a process that imported the trainer's stack and nothing else."""
    out = subprocess.run(
        [sys.executable, "-c", _RUNTIME_PROBE], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def plan_prediction(store: Path, args: argparse.Namespace) -> dict[str, Any]:
    from orchestrator.plan import ModelShape, trainer_host_memory
    from pairloop.jobs import DPOHyperparameters, Strategy

    shape = ModelShape.from_config(json.loads((store / "policy" / "config.json").read_text()))
    hp = DPOHyperparameters.model_validate(
        {**_hyperparameters(args, "fsdp"), "bf16": False, "gradient_checkpointing": False}
    )
    out: dict[str, Any] = {"parameters": shape.parameters}
    strategies: tuple[Strategy, ...] = ("fsdp", "ddp")
    for strategy in strategies:
        for rank in (0, 1):
            phases = trainer_host_memory(
                shape, hp, strategy=strategy, gpus=2, device="cpu", rank=rank
            )
            out[f"{strategy}_rank{rank}"] = {
                name: {"bytes": sum(parts.values()), "parts": parts}
                for name, parts in phases.items()
            }
        out[f"{strategy}_peak_bytes"] = max(
            v["bytes"] for r in (0, 1) for v in out[f"{strategy}_rank{r}"].values()
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    import torch

    from pairloop.logs import configure_logging

    configure_logging("bench", "WARNING")
    store = Path(tempfile.mkdtemp(prefix="trainer-memory-"))
    try:
        build_store(store, args)
        runtime = runtime_rss()
        strategies = [args.only] if args.only else ["fsdp", "ddp"]
        jobs = {strategy: run_job(store, args, strategy) for strategy in strategies}
        if args.only:
            ranks = jobs[args.only]["ranks"]
            print(f"{args.only}: peak RSS per rank {[r['peak_rss_bytes'] / GIB for r in ranks]}")
            return 0
        plan = plan_prediction(store, args)
    finally:
        shutil.rmtree(store, ignore_errors=True)

    peaks = {s: [r["peak_rss_bytes"] for r in j["ranks"]] for s, j in jobs.items()}
    fsdp_peak, ddp_peak = max(peaks["fsdp"]), max(peaks["ddp"])
    plan_peak = plan["fsdp_peak_bytes"]
    print(
        f"model: {plan['parameters'] / 1e6:.1f}M parameters, 2 CPU ranks, 1 pair x accumulation "
        f"{jobs['fsdp']['gradient_accumulation_steps']}, {args.max_length} tokens, "
        f"{args.steps} steps; runtime alone {runtime / GIB:.2f} GiB"
    )
    for strategy in ("fsdp", "ddp"):
        per_rank = ", ".join(f"{x / GIB:.2f}" for x in peaks[strategy])
        loaded = [r["loaded_numel"] for r in jobs[strategy]["ranks"]]
        planned = ", ".join(
            f"{max(v['bytes'] for v in plan[f'{strategy}_rank{r}'].values()) / GIB:.2f}"
            for r in (0, 1)
        )
        print(
            f"  {strategy:4s} peak RSS per rank [{per_rank}] GiB (plan [{planned}]); parameter "
            f"elements read per rank {loaded}"
        )
    ratio, error = fsdp_peak / ddp_peak, plan_peak / fsdp_peak - 1
    print(f"  fsdp / ddp peak: {ratio:.2f} (goal <= 0.60: {'met' if ratio <= 0.6 else 'NOT met'})")
    print(
        f"  plan {plan_peak / GIB:.2f} GiB vs fsdp measured {fsdp_peak / GIB:.2f} GiB: "
        f"{100 * error:+.0f}% (goal within 20%: {'met' if abs(error) <= 0.2 else 'NOT met'})"
    )
    report = {
        "bench": "trainer_memory",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "config": vars(args),
        "fsdp_peak_rss_bytes": fsdp_peak,
        "ddp_peak_rss_bytes": ddp_peak,
        "plan_fsdp_peak_bytes": plan_peak,
        "fsdp_over_ddp": ratio,
        "plan_error": error,
        "runtime_rss_bytes": runtime,
        "peak_rss_bytes_per_rank": peaks,
        "jobs": jobs,
        "plan": plan,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trainer_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {RESULTS / 'trainer_memory.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

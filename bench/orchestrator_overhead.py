"""Orchestrator overhead: an iteration's wall time minus the time spent inside the services and the
training task, as a share of the iteration (goal: under 3%).

    python -m bench.orchestrator_overhead                        # tiny loop (3 iterations) and 100m (1)
    python -m bench.orchestrator_overhead --presets tiny

Each preset runs the real loop (`orchestrator.loop.execute_run`) on the embedded stack (vLLM
generator, ranker with the demo's scorer, Celery worker, Redis) with the demo's config. Per
iteration (generate, rank, pairs, train, swap, evaluate):

    wall      = sum of the stages' wall times (from the manifest)
    inside    = time inside generator/ranker HTTP calls (the typed clients' `service_seconds`;
                one call in flight at a time here, so calls do not overlap)
                + the training task's own run time (`TrainResult.seconds`)
                + the trainer worker's queueing (submit -> task start: the worker forks a fresh
                  child per job, ~2 s on this host), reported separately
    overhead  = wall - inside: reading and writing shards, building pairs and datasets, manifest
                writes, JSON (de)serialisation, Celery submission and result polling.

Figures are printed and written to bench/results/orchestrator_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr
from rich.console import Console

from orchestrator.demo import DEMO_RANKER_ARGS, demo_config
from orchestrator.local import LocalStack, StackSpec
from orchestrator.loop import create_run, execute_run
from orchestrator.manifest import Manifest
from orchestrator.settings import OrchestratorSettings
from pairloop_local.tiny_models import build_tiny_chat_model

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("generate", "rank", "pairs", "train", "swap", "evaluate")

# The 100m model is ~400x the tiny one: a shorter loop keeps the run to a few minutes on 2 cores.
PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "100m": {
        "prompts": {"per_iteration": 16, "eval_prompts": 16},
        "shard_size": 16,
        "sampling": {"max_tokens": 24},
        "evaluation": {"max_tokens": 24},
        "dpo": {"per_device_train_batch_size": 4, "num_train_epochs": 1, "learning_rate": 1e-5},
    },
}


def iteration_figures(m: Manifest) -> list[dict[str, float]]:
    rows = []
    for k in range(1, m.iterations + 1):
        st = m.iteration_stages(k)
        wall = sum(st[s].seconds for s in STAGES if s in st)
        tm = st["train"].metrics
        train = tm.get("train_seconds", 0.0)
        queue = max(0.0, (tm.get("task_started_at") or 0.0) - (st["train"].started_at or 0.0))
        http = sum(st[s].service_seconds for s in STAGES if s in st and s != "train")
        inside = http + train + queue
        rows.append(
            {
                "iteration": k,
                "wall_s": round(wall, 3),
                "inside_services_s": round(http, 3),
                "inside_training_task_s": round(train, 3),
                "trainer_queue_s": round(queue, 3),
                "overhead_s": round(wall - inside, 3),
                "overhead_share": round((wall - inside) / wall, 4),
                "train_poll_and_submit_s": round(st["train"].seconds - train - queue, 3),
            }
        )
    return rows


def run_preset(preset: str, iterations: int, work: Path, console: Console) -> dict[str, Any]:
    store = work / "store"
    base = store / "models" / f"base-{preset}"
    build_tiny_chat_model(base, arch="llama", preset=preset, seed=0)
    spec = StackSpec(store=store, base_model=base, ranker_args=DEMO_RANKER_ARGS)
    with LocalStack(spec, work / preset) as stack:
        cfg = demo_config(
            store=store,
            base_model=base,
            generator_url=stack.generator_url,
            ranker_url=stack.ranker_url,
            redis_url=stack.redis_url,
            iterations=iterations,
        )
        cfg["services"]["concurrency"] = 1  # non-overlapping calls: their times add up to wall time
        for key, change in PRESET_CHANGES[preset].items():
            cfg[key] = {**cfg[key], **change} if isinstance(change, dict) else change
        path = work / f"{preset}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run_dir = create_run(path, run_id=f"bench-{preset}-{int(time.time())}")
        settings = OrchestratorSettings(generator_admin_token=SecretStr(stack.admin_token))
        manifest = asyncio.run(execute_run(run_dir, console=console, settings=settings))
    rows = iteration_figures(manifest)
    wall = sum(r["wall_s"] for r in rows)
    over = sum(r["overhead_s"] for r in rows)
    return {
        "preset": preset,
        "iterations": rows,
        "total_wall_s": round(wall, 3),
        "total_overhead_s": round(over, 3),
        "overhead_share": round(over / wall, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--presets", nargs="+", default=["tiny", "100m"], choices=sorted(PRESET_CHANGES)
    )
    parser.add_argument("--iterations", type=int, default=None, help="default: 3 tiny, 1 for 100m")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    console = Console()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pairloop-bench-orch-"))
    results = []
    for preset in args.presets:
        iters = args.iterations or (3 if preset == "tiny" else 1)
        result = run_preset(preset, iters, work / preset, console)
        results.append(result)
        for r in result["iterations"]:
            console.print(
                f"{preset} iter {r['iteration']}: wall {r['wall_s']:.2f}s, services {r['inside_services_s']:.2f}s, "
                f"training task {r['inside_training_task_s']:.2f}s, trainer queue {r['trainer_queue_s']:.2f}s, "
                f"overhead {r['overhead_s']:.2f}s ({100 * r['overhead_share']:.2f}%; submit+poll "
                f"{r['train_poll_and_submit_s']:.2f}s)"
            )
        console.print(
            f"[bold]{preset}: overhead {100 * result['overhead_share']:.2f}% of {result['total_wall_s']:.1f}s[/bold]"
        )
    report = {
        "benchmark": "orchestrator_overhead",
        "host": platform.node(),
        "cpus": __import__("os").cpu_count(),
        "goal": "overhead share < 0.03",
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "orchestrator_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"written: {RESULTS / 'orchestrator_overhead.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ranker replicas: one ranker process with 1 replica vs N replicas (`--devices`), side by side.

    python -m bench.ranker_replicas                              # CPU: cpu,cpu (2 replicas)
    python -m bench.ranker_replicas --devices cpu,cpu,cpu,cpu --prompts 32
    python -m bench.ranker_replicas --devices cuda:all --dtype bfloat16 --preset large \\
        --prompts 2000 --batch-size 128 --max-batch-tokens 262144 --tag gpu     # GPU host

The same random PairRM checkpoint (`pairloop_local.tiny_ranker` preset) and the same inputs
(bench.ranker_throughput's log-normal lengths) go to two real service processes in turn: one with
a single replica on the first device of the list, one with a replica on every device. The client
keeps 2 requests per replica of the N-replica service in flight, as the orchestrator's rank stage
does (`orchestrator.stages.rank.REQUESTS_PER_REPLICA`), for both sides. Measured, best of
`--repeats` alternating runs: full-mode pairs/s per side and their ratio, each replica's requests
and comparisons (from /metrics), and the largest score difference between the two sides (goal:
none beyond float error: a request is served whole by one replica).

On CPU every replica is a set of threads in one process: the N-replica side gets `cores / N`
torch threads per replica (OMP_NUM_THREADS of the process, one inference thread per replica), the
one-replica side every core, so both use the same cores; the ratio says what splitting them into
replicas gains (little on a shared 2-core host). On GPUs each replica has its own device, and the
ratio is the point: near N when the load keeps every replica busy.
Figures are printed and written to bench/results/ranker_replicas[_TAG].json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import write_result
from bench.ranker_throughput import make_inputs
from orchestrator.stages.rank import REQUESTS_PER_REPLICA
from pairloop_local.processes import ManagedProcess, free_port
from pairloop_local.tiny_ranker import PAIRRM_PRESETS, build_tiny_pairrm


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", default="cpu,cpu", help="the N-replica side (cuda:all: all GPUs)")
    p.add_argument("--preset", default="mid", choices=sorted(PAIRRM_PRESETS))
    p.add_argument("--model-dir", type=Path, help="reuse a checkpoint built by a previous run")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=32, help="service: rows per forward pass")
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--items-per-request", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the results file (e.g. gpu)")
    return p


def resolve(devices: str) -> list[str]:
    """The replica devices `devices` names (`cuda:all`: every visible GPU, as the service does)."""
    if devices != "cuda:all":
        return [d.strip() for d in devices.split(",")]
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise SystemExit("--devices cuda:all: no CUDA device is visible")
    return [f"cuda:{i}" for i in range(count)]


def start(model_dir: Path, devices: list[str], args: argparse.Namespace, log: Path) -> Any:
    """A service process with a replica on each of `devices`; returns (process, url)."""
    port = free_port()
    env = dict(os.environ)
    if all(d == "cpu" for d in devices):
        # The same cores for both sides: divided between the replicas' inference threads.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(devices)))
    argv = [
        sys.executable, "-m", "services.ranker", "--model", str(model_dir), "--port", str(port),
        "--devices", ",".join(devices), "--dtype", args.dtype,
        "--batch-size", str(args.batch_size), "--max-batch-tokens", str(args.max_batch_tokens),
        "--batch-wait-ms", str(args.batch_wait_ms),
        "--max-items", str(max(args.items_per_request, 1)),
        "--max-candidates", str(max(args.candidates, 2)), "--log-level", "WARNING",
    ]  # fmt: skip
    proc = ManagedProcess("ranker", argv, log_path=log, env=env)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    proc.wait_ready(f"{url}/ready", timeout=1200)
    return proc, url


async def _rank_all(url: str, items: list[dict[str, Any]], per_request: int, in_flight: int) -> Any:
    chunks = [items[i : i + per_request] for i in range(0, len(items), per_request)]
    gate = asyncio.Semaphore(in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:

        async def one(chunk: list[dict[str, Any]]) -> list[list[float]]:
            async with gate:
                r = await client.post("/v1/rank", json={"items": chunk, "mode": "full"})
            r.raise_for_status()
            return [res["scores"] for res in r.json()["results"]]

        parts = await asyncio.gather(*(one(c) for c in chunks))
    return [s for part in parts for s in part]


def per_replica(before: str, after: str, name: str) -> dict[str, float]:
    """How much counter `name` grew per replica ("0:cuda:0", ...) between two /metrics bodies."""
    from prometheus_client.parser import text_string_to_metric_families

    def values(body: str) -> dict[str, float]:
        return {
            f"{s.labels['replica']}:{s.labels['device']}": s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
            if s.name == name and "replica" in s.labels
        }

    start = values(before)
    return {k: v - start.get(k, 0.0) for k, v in values(after).items()}


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from services.ranker.blender_adapter import load_blender

    devices = resolve(args.devices)
    if len(devices) < 2:
        raise SystemExit("--devices: name at least two replicas to compare with one")
    work = Path(tempfile.mkdtemp(prefix="ranker-replicas-bench-"))
    model_dir = args.model_dir or build_tiny_pairrm(work / "pairrm", preset=args.preset, seed=0)
    # llm-blender's own tokenizer (the checkpoint's, with PairRM's added tokens), as the service.
    tokenizer = load_blender(str(model_dir), device="cpu").ranker_tokenizer
    inputs, cands = make_inputs(
        tokenizer, prompts=args.prompts, candidates=args.candidates, seed=args.seed
    )
    items = [{"prompt": p, "candidates": c} for p, c in zip(inputs, cands, strict=True)]
    n = args.candidates
    pairs = args.prompts * n * (n - 1)
    in_flight = REQUESTS_PER_REPLICA * len(devices)
    sides = {"one": devices[:1], "all": devices}
    print(
        f"PairRM preset {args.preset} {args.dtype}; 1 replica on {devices[0]} vs "
        f"{len(devices)} on {', '.join(devices)}; {args.prompts} prompts x {n} candidates "
        f"({pairs} pairs), {args.items_per_request} per request, {in_flight} in flight",
        flush=True,
    )
    runs: dict[str, list[float]] = {"one": [], "all": []}
    scores: dict[str, Any] = {}
    metrics: dict[str, tuple[str, str]] = {}  # /metrics before and after the timed runs
    for name, devs in sides.items():
        proc, url = start(model_dir, devs, args, work / f"ranker-{name}.log")
        try:
            asyncio.run(_rank_all(url, items[:2], 1, 1))  # warm-up (allocator, kernels)
            before = httpx.get(f"{url}/metrics", timeout=30).text
            for _ in range(args.repeats):
                started = time.perf_counter()
                scores[name] = asyncio.run(_rank_all(url, items, args.items_per_request, in_flight))
                runs[name].append(time.perf_counter() - started)
                print(f"  {len(devs)} replica(s): {runs[name][-1]:.1f}s", flush=True)
            metrics[name] = (before, httpx.get(f"{url}/metrics", timeout=30).text)
        finally:
            proc.stop()

    best = {name: min(r) for name, r in runs.items()}
    rate = {name: pairs / s for name, s in best.items()}
    ratio = rate["all"] / rate["one"]
    diff = float(np.abs(np.array(scores["all"]) - np.array(scores["one"])).max())
    requests = per_replica(*metrics["all"], "pairloop_ranker_replica_requests_total")
    comparisons = per_replica(*metrics["all"], "pairloop_ranker_comparisons_total")
    print(
        f"full mode: 1 replica {rate['one']:.1f} pairs/s, {len(devices)} replicas "
        f"{rate['all']:.1f} pairs/s: {ratio:.2f}x; max |score diff| {diff:.1e}\n"
        f"requests per replica {requests}; comparisons per replica {comparisons}"
    )
    cpu = all(d == "cpu" for d in devices)
    result = {
        "benchmark": "ranker_replicas",
        "command": "python -m bench.ranker_replicas " + " ".join(argv or sys.argv[1:]),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "devices": devices,
        "torch_threads_per_replica": (
            {"one": os.cpu_count(), "all": max(1, (os.cpu_count() or 1) // len(devices))}
            if cpu
            else None
        ),
        "pairs": pairs,
        "requests_in_flight": in_flight,
        "runs_seconds": runs,
        "pairs_per_s": {"one_replica": rate["one"], f"{len(devices)}_replicas": rate["all"]},
        "ratio": ratio,
        "max_abs_score_diff": diff,
        "requests_per_replica": requests,
        "comparisons_per_replica": comparisons,
    }
    print(f"wrote {write_result('ranker_replicas', args.tag, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ranker on a crowded GPU: PairRM's shape, its longest inputs, the compose batch settings.

    python -m bench.ranker_gpu_memory                       # needs CUDA; about 5 minutes on an H100
    python -m bench.ranker_gpu_memory --taken 0.8 --requests 24 --items-per-request 32

What it does, on one CUDA device:
  1. builds a random PairRM with DeBERTa-v3-large's shape (`pairloop_local.tiny_ranker`, preset
     `large`: 24 layers, hidden 1024, 16 heads; random weights, vocabulary excepted);
  2. starts a process that takes `--taken` (default 80%) of the GPU's memory and holds it, as a
     vLLM with gpu_memory_utilization 0.8 does next to the ranker in compose;
  3. starts the ranker service (`python -m services.ranker`) in bfloat16 with the compose batch
     settings (128 rows, 262,144 tokens per pass) and the default memory budget;
  4. sends the longest inputs PairRM takes (prompts past 1224 tokens, candidates past 412: all are
     truncated to the limits, so every comparison is 2048 tokens), 5 candidates per item, full
     mode (20 comparisons per item), `--in-flight` requests at a time, as the orchestrator does.
Reported: failed requests (goal 0), out-of-memory splits (`pairloop_ranker_oom_splits_total`),
the last planned budget, comparisons (pairs) per second, and the GPU's peak memory as the driver
saw it. Written to bench/results/ranker_gpu_memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from pairloop_local.processes import ManagedProcess, free_port
from pairloop_local.tiny_ranker import build_tiny_pairrm

RESULTS = Path(__file__).resolve().parent / "results"

_WORDS = [
    "the", "answer", "explains", "each", "step", "of", "method", "in", "detail", "with",
    "examples", "water", "light", "sky", "blue", "because", "story", "simple", "model", "data",
]  # fmt: skip

# Holds `fraction` of the device's total memory until killed (a stand-in for vLLM's KV cache).
_HOG = """
import sys, time, torch
fraction = float(sys.argv[1])
free, total = torch.cuda.mem_get_info()
block = torch.empty(int(total * fraction) - (total - free), dtype=torch.uint8, device="cuda")
print("held", block.numel(), flush=True)
while True:
    time.sleep(60)
"""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--taken", type=float, default=0.8, help="share of GPU memory held elsewhere")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--items-per-request", type=int, default=32, help="ranker.batch_prompts")
    p.add_argument("--candidates", type=int, default=5, help="samples per prompt (the recipe's)")
    p.add_argument("--in-flight", type=int, default=8, help="services.concurrency")
    p.add_argument("--batch-size", type=int, default=128, help="compose PAIRLOOP_RANKER_BATCH_SIZE")
    p.add_argument("--max-batch-tokens", type=int, default=262_144)
    p.add_argument("--extra-ranker-args", default="", help="more flags for services.ranker")
    return p


def long_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def make_items(n: int, candidates: int, seed: int) -> list[dict[str, Any]]:
    """Items whose prompt and candidates all exceed PairRM's limits (1224 / 412 tokens)."""
    rng = random.Random(seed)
    return [
        {
            "prompt": long_text(rng, 1600),
            "candidates": [long_text(rng, 600) for _ in range(candidates)],
        }
        for _ in range(n)
    ]


async def send_all(url: str, bodies: list[dict[str, Any]], in_flight: int) -> list[int]:
    gate = asyncio.Semaphore(in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:

        async def one(body: dict[str, Any]) -> int:
            async with gate:
                r = await client.post("/v1/rank", json=body)
            return r.status_code

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def gpu_used_mib() -> list[int]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [int(x) for x in out.split()] if out.strip() else []


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on a GPU host only", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="ranker-gpu-"))
    t0 = time.perf_counter()
    model = build_tiny_pairrm(work / "pairrm-large", preset="large", seed=0)
    build_s = time.perf_counter() - t0
    hog = subprocess.Popen([sys.executable, "-c", _HOG, str(args.taken)], stdout=subprocess.PIPE)
    try:
        assert hog.stdout is not None
        held = hog.stdout.readline().decode().strip()
        free, total = torch.cuda.mem_get_info()
        port = free_port()
        argv_ = [
            sys.executable, "-m", "services.ranker", "--model", str(model), "--port", str(port),
            "--device", "cuda", "--dtype", "bfloat16",
            "--batch-size", str(args.batch_size), "--max-batch-tokens", str(args.max_batch_tokens),
            "--max-items", str(args.items_per_request), "--max-candidates", str(args.candidates),
            "--log-level", "WARNING", *args.extra_ranker_args.split(),
        ]  # fmt: skip
        ranker = ManagedProcess("ranker", argv_, log_path=work / "ranker.log")
        ranker.start()
        try:
            url = f"http://127.0.0.1:{port}"
            ranker.wait_ready(f"{url}/ready", timeout=900)
            bodies = [
                {"items": make_items(args.items_per_request, args.candidates, seed=i)}
                for i in range(args.requests)
            ]
            asyncio.run(send_all(url, bodies[:1], 1))  # warm-up (kernels, allocator)
            before = httpx.get(f"{url}/metrics", timeout=30).text
            started = time.perf_counter()
            statuses = asyncio.run(send_all(url, bodies, args.in_flight))
            seconds = time.perf_counter() - started
            after = httpx.get(f"{url}/metrics", timeout=30).text
            peak = gpu_used_mib()
        finally:
            ranker.stop()
    finally:
        hog.kill()
        hog.wait()
    comparisons = args.requests * args.items_per_request * args.candidates * (args.candidates - 1)
    name = "pairloop_ranker_oom_splits_total"
    result = {
        "benchmark": "ranker_gpu_memory",
        "device": torch.cuda.get_device_name(0),
        "gpu_total_gib": round(total / 2**30, 1),
        "gpu_free_gib_with_hog": round(free / 2**30, 1),
        "hog": held,
        "taken_share": args.taken,
        "batch_size": args.batch_size,
        "max_batch_tokens": args.max_batch_tokens,
        "requests": args.requests,
        "failed_requests": sum(1 for s in statuses if s != 200),
        "statuses": sorted(set(statuses)),
        "oom_splits": metric(after, name) - metric(before, name),
        "budget_bytes_last_plan": metric(after, "pairloop_ranker_batch_budget_bytes"),
        "comparisons": comparisons,
        "seconds": round(seconds, 2),
        "pairs_per_second": round(comparisons / seconds, 1),
        "gpu_used_mib_after": peak,
        "model_build_seconds": round(build_s, 1),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ranker_gpu_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["failed_requests"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Generator throughput: the service over HTTP vs the same engine in-process (goal: >= 90%).

    python -m bench.generator_throughput                      # tiny and 100m presets
    python -m bench.generator_throughput --presets tiny --prompts 32 --repeats 2

Both sides run `services.generator.engine` (the one vLLM adapter) built from one parsed
`GeneratorSettings` (the service's own flags), with the same chat prompts and sampling: n=1,
temperature 1, `max_tokens = min_tokens` so every sample has exactly that many tokens. One engine
at a time (two would share the host's cores): the in-process engine first, shut down, then the
service as a real process on loopback.

    in-process   `VllmEngine.generate` for every prompt at once (asyncio tasks), whole answers
    service      one POST /v1/chat/completions per prompt, all in flight at once (httpx, a
                 connection per request: see `_service_runs` for why not keep-alive)
    service batch  one POST /v1/batch/chat with every prompt (the orchestrator's path)

Each repeat uses fresh prompts (a repeat number opens each prompt), so the prefix cache never
serves a repeated prompt. Throughput is generated tokens / wall seconds, median over
repeats; the headline is service / in-process. Printed as a table and written to
bench/results/generator_throughput[_TAG].json.

Reading the figures on a 2-core host: vLLM's EngineCore (a busy loop) and its worker each keep a
core busy while decoding (measured: ~1 CPU s per wall second each), so whatever the HTTP server
and the client spend comes straight out of decoding. With the tiny model (steps of ~1 ms) that
shows; with 100m it is lost in the forward passes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from bench._generator_service import (
    RESULTS,
    ServiceSpec,
    build_store,
    make_console,
    rich_table,
    service_env,
    start_service,
    wait_ready,
)
from pairloop.atomic import atomic_write_json

GOAL = 0.90
# Tokens per sample: long enough that decoding, not set-up, dominates each run.
DEFAULT_NEW_TOKENS = {"tiny": 64, "100m": 32}

_TOPICS = (
    "the sea", "a rainbow", "cooking", "a detective story", "Paris", "the planets", "breakfast",
    "the blue sky", "sorting in Python", "Monet", "a meeting email", "learning Spanish",
)  # fmt: skip
_ASKS = ("Write a short poem about", "Explain", "Give three tips about", "Summarise", "Describe")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "100m"])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, help="tokens per sample (default: 64 tiny, 32 100m)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu-threads", type=int, default=1, help="the engine's OpenMP threads")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--kv-cache-mb", type=int, default=512)
    p.add_argument("--workdir", type=Path, help="reuse checkpoints built by a previous run")
    p.add_argument("--tag", default="", help="suffix of the results file (e.g. tiny256)")
    return p


def make_conversations(count: int, repeat: int) -> list[list[dict[str, str]]]:
    """`count` chat prompts of 10-60 words; the repeat number opens each one."""
    rng = random.Random(repeat)
    out = []
    for i in range(count):
        words = " ".join(rng.choice(_TOPICS) for _ in range(rng.randint(2, 12)))
        text = f"[{repeat}.{i}] {rng.choice(_ASKS)} {rng.choice(_TOPICS)}, with {words}."
        out.append([{"role": "user", "content": text}])
    return out


# --- in-process -----------------------------------------------------------------------------


async def _inprocess_runs(
    argv: list[str], args: argparse.Namespace, new_tokens: int
) -> list[dict[str, float]]:
    from pairloop.settings import load_settings
    from services.generator.engine import start_engine
    from services.generator.engine_types import SamplingSpec
    from services.generator.settings import GeneratorSettings

    settings = load_settings(GeneratorSettings, argv)
    engine = await start_engine(settings)
    spec = SamplingSpec(n=1, temperature=1.0, max_tokens=new_tokens, min_tokens=new_tokens)
    try:

        async def one(ids: list[int], rid: str) -> int:
            final = None
            async for step in engine.generate(ids, spec, rid, stream=False):
                final = step
            assert final is not None
            return sum(s.num_tokens for s in final.samples)

        async def run(convs: list[list[dict[str, str]]], tag: str) -> dict[str, float]:
            # Templating is inside the timed window, as it is in the service's handlers.
            t0, c0 = time.perf_counter(), time.process_time()
            prompts = [engine.render_chat(c) for c in convs]
            tokens = await asyncio.gather(
                *(one(ids, f"{tag}-{i}") for i, ids in enumerate(prompts))
            )
            return _figures(sum(tokens), time.perf_counter() - t0, time.process_time() - c0)

        await run(make_conversations(8, -1), "warmup")
        return [
            await run(make_conversations(args.prompts, k), f"run{k}") for k in range(args.repeats)
        ]
    finally:
        engine.shutdown()


# --- service --------------------------------------------------------------------------------


async def _service_run(
    client: httpx.AsyncClient, convs: list[list[dict[str, str]]], new_tokens: int, *, batch: bool
) -> dict[str, float]:
    sampling = {"temperature": 1.0, "max_tokens": new_tokens, "min_tokens": new_tokens}
    t0, c0 = time.perf_counter(), time.process_time()
    if batch:
        r = await client.post("/v1/batch/chat", json={"conversations": convs, **sampling})
        r.raise_for_status()
        tokens = sum(sum(res["completion_tokens"]) for res in r.json()["results"])
    else:

        async def one(conv: list[dict[str, str]]) -> int:
            r = await client.post("/v1/chat/completions", json={"messages": conv, **sampling})
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        tokens = sum(await asyncio.gather(*(one(c) for c in convs)))
    return _figures(tokens, time.perf_counter() - t0, time.process_time() - c0)


async def _service_runs(
    url: str, args: argparse.Namespace, new_tokens: int
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    # One connection per request (no keep-alive): httpx 0.28.1 / httpcore 1.0.9 hold requests
    # back for seconds before reusing pooled connections at 64 in flight (httpcore's trace shows
    # the headers sent 15 s after the call while the server's histogram says < 1 s per request;
    # a raw asyncio keep-alive client sees no stall). A loopback connect costs well under 1 ms.
    limits = httpx.Limits(max_connections=args.prompts, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        await _service_run(client, make_conversations(8, -1), new_tokens, batch=False)
        per_request, batched = [], []
        for k in range(args.repeats):
            convs = make_conversations(args.prompts, k)
            per_request.append(await _service_run(client, convs, new_tokens, batch=False))
            # Same prompts under another opening: fresh for the prefix cache too.
            convs = make_conversations(args.prompts, 1000 + k)
            batched.append(await _service_run(client, convs, new_tokens, batch=True))
    return per_request, batched


# --- both -------------------------------------------------------------------------------------


def _figures(tokens: int, seconds: float, cpu_s: float) -> dict[str, float]:
    """`cpu_s`: CPU seconds of this (the bench's) process: the engine's front end in-process,
    only the HTTP client for the service; the client shares the host's cores with the service."""
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "cpu_s": cpu_s}


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "runs": runs,
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "best_tokens_per_s": max(r["tokens_per_s"] for r in runs),
    }


def run_preset(
    preset: str, args: argparse.Namespace, work: Path, console: Console
) -> dict[str, Any]:
    new_tokens = args.new_tokens or DEFAULT_NEW_TOKENS.get(preset, 32)
    store = work / "store"
    model, _ = build_store(store, preset)
    spec = ServiceSpec(
        model=model,
        model_root=store,
        cpu_threads=args.cpu_threads,
        max_model_len=args.max_model_len,
        kv_cache_bytes=args.kv_cache_mb << 20,
    )
    scratch = work / f"scratch-{preset}"
    argv = spec.argv(port=0)[3:]  # the service's own flags, minus `python -m services.generator`

    # The in-process engine sees the environment the service gets (threads, caches, offline).
    saved = dict(os.environ)
    os.environ.update(service_env(scratch / "inprocess", args.cpu_threads))
    try:
        inproc = asyncio.run(_inprocess_runs(argv, args, new_tokens))
    finally:
        os.environ.clear()
        os.environ.update(saved)
        # The engine is shut down; collect it now, not at interpreter exit (its __del__ fails then).
        gc.collect()
    console.print(f"{preset} in-process: " + _runs_line(inproc))

    proc, url = start_service(spec, scratch / "service", f"generator-{preset}")
    try:
        wait_ready(proc, url)
        per_request, batched = asyncio.run(_service_runs(url, args, new_tokens))
    finally:
        proc.stop()
    console.print(f"{preset} service: " + _runs_line(per_request))
    console.print(f"{preset} service batch route: " + _runs_line(batched))

    expected = args.prompts * new_tokens
    for side in (inproc, per_request, batched):
        if any(r["tokens"] != expected for r in side):
            raise RuntimeError(f"{preset}: expected {expected} tokens per run, got {side}")
    result: dict[str, Any] = {
        "preset": preset,
        "prompts": args.prompts,
        "new_tokens_per_sample": new_tokens,
        "in_process": _summary(inproc),
        "service": _summary(per_request),
        "service_batch_route": _summary(batched),
    }
    base = result["in_process"]["median_tokens_per_s"]
    result["ratio_service_to_in_process"] = result["service"]["median_tokens_per_s"] / base
    result["ratio_batch_route_to_in_process"] = (
        result["service_batch_route"]["median_tokens_per_s"] / base
    )
    result["meets_goal"] = result["ratio_service_to_in_process"] >= GOAL
    return result


def _runs_line(runs: list[dict[str, float]]) -> str:
    return ", ".join(
        f"{r['tokens_per_s']:.0f} tok/s ({r['seconds']:.2f}s, bench process {r['cpu_s']:.2f} CPU s)"
        for r in runs
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    console = make_console()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pairloop-bench-throughput-"))
    results = [run_preset(p, args, work, console) for p in args.presets]

    rows = [
        [
            r["preset"],
            f"{r['prompts']} x {r['new_tokens_per_sample']}",
            f"{r['in_process']['median_tokens_per_s']:.0f}",
            f"{r['service']['median_tokens_per_s']:.0f}",
            f"{r['service_batch_route']['median_tokens_per_s']:.0f}",
            f"{100 * r['ratio_service_to_in_process']:.1f}%",
            f"{100 * r['ratio_batch_route_to_in_process']:.1f}%",
            "yes" if r["meets_goal"] else "NO",
        ]
        for r in results
    ]
    columns = [
        "model", "prompts x tokens", "in-process tok/s", "service tok/s", "batch route tok/s",
        "service/in-process", "batch/in-process", f">= {GOAL:.0%}",
    ]  # fmt: skip
    title = f"Generator throughput (median of {args.repeats}; {args.cpu_threads} engine thread(s))"
    console.print(rich_table(title, columns, rows))
    report = {
        "benchmark": "generator_throughput",
        "command": "python -m bench.generator_throughput " + " ".join(argv or sys.argv[1:]),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "goal": f"service tokens/s / in-process tokens/s >= {GOAL}",
        "results": results,
    }
    out = RESULTS / f"generator_throughput{'_' + args.tag if args.tag else ''}.json"
    atomic_write_json(out, report)
    console.print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

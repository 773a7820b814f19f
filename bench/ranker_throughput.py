"""Ranker throughput: the service vs llm-blender's own `Blender.rank(batch_size=8)`, side by side.

    python -m bench.ranker_throughput                      # CPU: mid-sized DeBERTa-v2 PairRM
    python -m bench.ranker_throughput --prompts 8 --repeats 1       # quicker
    python -m bench.ranker_throughput --device cuda --dtype bfloat16 --preset large \\
        --prompts 1000 --batch-size 128 --max-batch-tokens 262144 --tag gpu     # GPU host

Same random PairRM checkpoint (`pairloop_local.tiny_ranker` preset), same inputs, same device and dtype
for both sides. Inputs have realistic lengths: prompt and response token counts are log-normal
(medians 120 and 220 tokens, sigma 0.6, clipped to 800 and 400: UltraFeedback-like spread within
PairRM's limits), so padding is what it is in real use.
Measured, per side, best of `--repeats` alternating runs (the host is shared):
  - full mode: all n(n-1) ordered comparisons per prompt; pairs/s, and the largest score difference
    from llm-blender's (identical up to float error: goal <= 1e-5 in float32);
  - bubble mode: best and worst of n (llm-blender: `get_best_of_n` + `get_worst_of_n`, started from
    the identity permutation like the service); agreement of the picked indices;
  - the projected time to rank 20,000 prompts x n responses in each mode.
The service runs as a real process on loopback; the client sends `--items-per-request` items per
request with `--in-flight` requests outstanding, as the orchestrator does. Figures are printed and
written to bench/results/ranker_throughput[_TAG].json.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import write_result
from pairloop_local.processes import ManagedProcess, free_port
from pairloop_local.tiny_ranker import PAIRRM_PRESETS, build_tiny_pairrm

PROJECT_PROMPTS = 20_000

_VOCABULARY = (
    "the a of to and in is that it for on with as be by this are or an from at which can your "
    "answer question explain step first then water light sky blue because story example simple "
    "function returns list numbers important however therefore finally summary helpful clear "
    "write code python data model train learn people time world good best way make use need"
)
_WORDS = _VOCABULARY.split()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="mid", choices=sorted(PAIRRM_PRESETS))
    p.add_argument("--model-dir", type=Path, help="reuse a checkpoint built by a previous run")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reference-batch-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32, help="service: rows per forward pass")
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--items-per-request", type=int, default=8)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-bubble", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the results file (e.g. gpu)")
    return p


def make_inputs(
    tokenizer: Any, *, prompts: int, candidates: int, seed: int
) -> tuple[list[str], list[list[str]]]:
    """Texts of log-normal token lengths (Metaspace tokenization is additive over words)."""
    rng = random.Random(seed)
    cost = {w: len(tokenizer(w, add_special_tokens=False).input_ids) for w in _WORDS}

    def text(median: float, lo: int, hi: int) -> str:
        target = min(hi, max(lo, int(rng.lognormvariate(math.log(median), 0.6))))
        out: list[str] = []
        used = 0
        while used < target:
            word = rng.choice(_WORDS)
            out.append(word)
            used += cost[word]
        return " ".join(out)

    # Within PairRM's limits, so both sides see the same tokens: llm-blender's candidate limit
    # (412 + half the unused source budget) depends on the longest prompt of its batch.
    inputs = [text(120, 16, 800) for _ in range(prompts)]
    cands = [[text(220, 16, 400) for _ in range(candidates)] for _ in range(prompts)]
    return inputs, cands


def timed(fn: Callable[[], Any], cpu_clock: Callable[[], float]) -> tuple[float, float, Any]:
    """Wall seconds, CPU seconds (of whoever does the work) and the result of `fn()`."""
    cpu, started = cpu_clock(), time.perf_counter()
    out = fn()
    return time.perf_counter() - started, cpu_clock() - cpu, out


def process_cpu_clock(pid: int) -> Callable[[], float]:
    """CPU seconds (user + system, all threads) used so far by process `pid`."""
    import psutil

    proc = psutil.Process(pid)

    def clock() -> float:
        t = proc.cpu_times()
        return float(t.user + t.system)

    return clock


async def _service_run(
    url: str, items: list[dict[str, Any]], *, mode: str, per_request: int, in_flight: int
) -> list[dict[str, Any]]:
    chunks = [items[i : i + per_request] for i in range(0, len(items), per_request)]
    gate = asyncio.Semaphore(in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:

        async def one(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
            async with gate:
                r = await client.post("/v1/rank", json={"items": chunk, "mode": mode})
            r.raise_for_status()
            return r.json()["results"]

        parts = await asyncio.gather(*(one(c) for c in chunks))
    return [r for part in parts for r in part]


def service_rank(url: str, items: list[dict[str, Any]], args: argparse.Namespace, mode: str) -> Any:
    return asyncio.run(
        _service_run(
            url, items, mode=mode, per_request=args.items_per_request, in_flight=args.in_flight
        )
    )


def start_service(model_dir: Path, args: argparse.Namespace, log_dir: Path) -> ManagedProcess:
    port = free_port()
    argv = [
        sys.executable, "-m", "services.ranker", "--model", str(model_dir), "--port", str(port),
        "--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
        "--max-batch-tokens", str(args.max_batch_tokens),
        "--batch-wait-ms", str(args.batch_wait_ms),
        "--max-items", str(max(args.items_per_request, 1)),
        "--max-candidates", str(max(args.candidates, 2)), "--log-level", "WARNING",
    ]  # fmt: skip
    proc = ManagedProcess("ranker", argv, log_path=log_dir / "ranker.log")
    proc.start()
    proc.wait_ready(f"http://127.0.0.1:{port}/ready", timeout=600)
    # The bench carries the URL on the process object it hands around.
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]  # see above
    return proc


def projection(seconds: float, prompts: int) -> float:
    return seconds / prompts * PROJECT_PROMPTS


def bubble_reference(blender: Any, inputs: Sequence[str], cands: Sequence[Sequence[str]], bs: int):
    import torch

    randperm = torch.randperm
    torch.randperm = lambda n, *a, **k: torch.arange(n)  # the service's deterministic start
    try:
        best = blender.get_best_of_n(inputs, cands, pairrm_cmp_type="bubble", batch_size=bs)
        worst = blender.get_worst_of_n(inputs, cands, pairrm_cmp_type="bubble", batch_size=bs)
    finally:
        torch.randperm = randperm
    return best, worst


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from services.ranker.blender_adapter import load_blender

    work = Path(tempfile.mkdtemp(prefix="ranker-bench-"))
    model_dir = args.model_dir or build_tiny_pairrm(work / "pairrm", preset=args.preset, seed=0)
    blender = load_blender(str(model_dir), device=args.device)
    if args.dtype != "float32":
        blender.ranker.to(getattr(torch, args.dtype))
    params = sum(p.numel() for p in blender.ranker.parameters())
    inputs, cands = make_inputs(
        blender.ranker_tokenizer, prompts=args.prompts, candidates=args.candidates, seed=args.seed
    )
    tok = blender.ranker_tokenizer
    prompt_tokens = [len(tok(x).input_ids) for x in inputs]
    cand_tokens = [len(tok(c).input_ids) for cs in cands for c in cs]
    items = [{"prompt": p, "candidates": c} for p, c in zip(inputs, cands, strict=True)]
    n = args.candidates
    pairs = args.prompts * n * (n - 1)
    bs = args.reference_batch_size
    print(
        f"PairRM preset {args.preset} ({params / 1e6:.1f}M params) on {args.device} {args.dtype}, "
        f"torch threads {torch.get_num_threads()}; {args.prompts} prompts x {n} candidates; "
        f"prompt tokens median {int(np.median(prompt_tokens))}, candidate tokens median "
        f"{int(np.median(cand_tokens))} (max {max(prompt_tokens)}, {max(cand_tokens)})"
    )
    service = start_service(model_dir, args, work)
    try:
        url = service.url  # type: ignore[attr-defined]  # set by start_service
        # Warm-up both sides (first calls pay for allocator and kernel set-up).
        blender.rank(inputs[:2], [c for c in cands[:2]], return_scores=True, batch_size=bs)
        service_rank(url, items[:2], args, "full")

        # CPU seconds as well as wall seconds: on a shared host, other work stretches wall time
        # but hardly the CPU time each side needs.
        service_cpu = process_cpu_clock(service.pid)
        ref_runs, svc_runs = [], []
        for _ in range(args.repeats):
            ref_wall, ref_cpu, ref_scores = timed(
                lambda: blender.rank(inputs, cands, return_scores=True, batch_size=bs),
                time.process_time,
            )
            ref_runs.append((ref_wall, ref_cpu))
            svc_wall, svc_cpu, svc_results = timed(
                lambda: service_rank(url, items, args, "full"), service_cpu
            )
            svc_runs.append((svc_wall, svc_cpu))
            print(
                f"  full: llm-blender {ref_wall:.1f}s ({ref_cpu:.1f} CPU s), "
                f"service {svc_wall:.1f}s ({svc_cpu:.1f} CPU s)"
            )
        svc_scores = np.array([r["scores"] for r in svc_results])
        max_diff = float(np.abs(svc_scores - ref_scores).max())
        same_best = float(np.mean(svc_scores.argmax(1) == ref_scores.argmax(1)))
        same_worst = float(np.mean(svc_scores.argmin(1) == ref_scores.argmin(1)))
        ref_wall, svc_wall = min(w for w, _ in ref_runs), min(w for w, _ in svc_runs)
        ref_cpu, svc_cpu = min(c for _, c in ref_runs), min(c for _, c in svc_runs)
        full = {
            "pairs": pairs,
            "runs_wall_cpu_seconds": {"reference": ref_runs, "service": svc_runs},
            "reference_seconds": ref_wall,
            "service_seconds": svc_wall,
            "reference_pairs_per_s": pairs / ref_wall,
            "service_pairs_per_s": pairs / svc_wall,
            "speedup": ref_wall / svc_wall,
            "reference_pairs_per_cpu_s": pairs / ref_cpu,
            "service_pairs_per_cpu_s": pairs / svc_cpu,
            "cpu_speedup": ref_cpu / svc_cpu,
            "max_abs_score_diff": max_diff,
            "best_index_agreement": same_best,
            "worst_index_agreement": same_worst,
            "reference_projection_s": projection(ref_wall, args.prompts),
            "service_projection_s": projection(svc_wall, args.prompts),
        }
        print(
            f"full mode: llm-blender {full['reference_pairs_per_s']:.1f} pairs/s, service "
            f"{full['service_pairs_per_s']:.1f} pairs/s: {full['speedup']:.2f}x "
            f"({full['cpu_speedup']:.2f}x in CPU seconds); max |score diff| {max_diff:.2e}; "
            f"best/worst agree {same_best:.0%}/{same_worst:.0%}"
        )

        bubble: dict[str, Any] | None = None
        if not args.skip_bubble:
            t_ref, c_ref, (best, worst) = timed(
                lambda: bubble_reference(blender, inputs, cands, bs), time.process_time
            )
            t_svc, c_svc, results = timed(
                lambda: service_rank(url, items, args, "bubble"), service_cpu
            )
            agree = np.mean(
                [
                    c[r["best_index"]] == b and c[r["worst_index"]] == w
                    for c, r, b, w in zip(cands, results, best, worst, strict=True)
                ]
            )
            bubble = {
                "reference_seconds": t_ref,
                "service_seconds": t_svc,
                "speedup": t_ref / t_svc,
                "reference_cpu_seconds": c_ref,
                "service_cpu_seconds": c_svc,
                "cpu_speedup": c_ref / c_svc,
                "best_and_worst_agreement": float(agree),
                "reference_projection_s": projection(t_ref, args.prompts),
                "service_projection_s": projection(t_svc, args.prompts),
            }
            print(
                f"bubble mode (best + worst): llm-blender {t_ref:.1f}s, service {t_svc:.1f}s: "
                f"{bubble['speedup']:.2f}x ({bubble['cpu_speedup']:.2f}x in CPU seconds); "
                f"picks agree on {agree:.0%} of prompts"
            )
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        service.stop()

    print(
        f"projected, {PROJECT_PROMPTS:,} prompts x {n}: full mode llm-blender "
        f"{full['reference_projection_s'] / 3600:.2f} h, service "
        f"{full['service_projection_s'] / 3600:.2f} h"
        + (
            f"; bubble llm-blender {bubble['reference_projection_s'] / 3600:.2f} h, service "
            f"{bubble['service_projection_s'] / 3600:.2f} h"
            if bubble
            else ""
        )
    )
    padding = _padding_share(metrics)
    result = {
        "benchmark": "ranker_throughput",
        "command": "python -m bench.ranker_throughput " + " ".join(argv or sys.argv[1:]),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_params": params,
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens_median": int(np.median(prompt_tokens)),
        "candidate_tokens_median": int(np.median(cand_tokens)),
        "service_padding_share": padding,
        "full": full,
        "bubble": bubble,
    }
    out = write_result("ranker_throughput", args.tag, result)
    print(f"service padding share {padding:.1%}; wrote {out}")
    return 0


def _padding_share(metrics: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == "pairloop_ranker_batch_tokens_total":
                values[s.labels["kind"]] = s.value
    total = values.get("real", 0) + values.get("padding", 0)
    return values.get("padding", 0) / total if total else 0.0


if __name__ == "__main__":
    raise SystemExit(main())

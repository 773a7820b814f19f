"""Generator weight swap vs restart: an in-place swap as a share of a cold start (goal: under 2%).

    python -m bench.generator_swap                         # tiny and 100m presets, 3 restarts each
    python -m bench.generator_swap --presets tiny --restarts 2 --swaps 4

Per preset, two checkpoints of the same shape (`pairloop_local.tiny_models`, weight seeds 0 and 1) in a
model store. Each repeat cold-starts the real service (`python -m services.generator`) and times

    restart -> ready   spawn -> GET /ready answers 200 (imports, engine build, weights loaded)
    restart -> first   spawn -> the first completion has come back
    swap               POST /admin/weights wall time (client side), alternating the checkpoints
    swap (server)      the reply's own `seconds` (validation + drain + reload + cache reset) and
                       `paused_seconds` (how long new requests were held back)
    swap -> first      POST start -> the first completion on the new weights has come back

then stops the service. Figures are medians over all repeats; the headline ratio is
median swap / median restart-to-first-completion. Printed as a table and written to
bench/results/generator_swap.json.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
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
    ADMIN_TOKEN,
    RESULTS,
    ServiceSpec,
    build_store,
    make_console,
    rich_table,
    start_service,
    wait_ready,
)
from pairloop.atomic import atomic_write_json

GOAL = 0.02
COMPLETION = {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "100m"])
    p.add_argument("--restarts", type=int, default=3, help="cold starts per preset")
    p.add_argument("--swaps", type=int, default=4, help="swaps per cold start")
    p.add_argument("--cpu-threads", type=int, default=1, help="the engine's OpenMP threads")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--kv-cache-mb", type=int, default=256)
    p.add_argument("--workdir", type=Path, help="reuse checkpoints built by a previous run")
    return p


def _complete(client: httpx.Client, url: str) -> str:
    r = client.post(f"{url}/v1/completions", json=COMPLETION, timeout=600)
    r.raise_for_status()
    return str(r.json()["weight_version"])


def one_restart(
    spec: ServiceSpec, dirs: tuple[Path, Path], swaps: int, scratch: Path, k: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One cold start then `swaps` swaps on it; returns (restart figures, list of swap figures)."""
    started = time.perf_counter()
    proc, url = start_service(spec, scratch, f"generator-{k}")
    try:
        wait_ready(proc, url)
        ready = time.perf_counter() - started
        with httpx.Client() as client:
            _complete(client, url)
            first = time.perf_counter() - started
            restart = {"ready_s": ready, "first_completion_s": first}
            figures = []
            for i in range(swaps):
                target = dirs[(i + 1) % 2]  # seed0 serves at start: seed1, seed0, seed1, ...
                version = f"v{k}-{i}"
                t0 = time.perf_counter()
                r = client.post(
                    f"{url}/admin/weights",
                    json={"path": target.name, "version": version},
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                    timeout=600,
                )
                wall = time.perf_counter() - t0
                r.raise_for_status()
                served = _complete(client, url)
                to_first = time.perf_counter() - t0
                if served != version:
                    raise RuntimeError(f"after swapping to {version} the service said {served}")
                body = r.json()
                figures.append(
                    {
                        "wall_s": wall,
                        "server_s": body["seconds"],
                        "paused_s": body["paused_seconds"],
                        "to_first_completion_s": to_first,
                    }
                )
    finally:
        proc.stop()
    return restart, figures


def run_preset(
    preset: str, args: argparse.Namespace, work: Path, console: Console
) -> dict[str, Any]:
    store = work / "store"
    dirs = build_store(store, preset)
    params = _param_count(dirs[0])
    spec = ServiceSpec(
        model=dirs[0],
        model_root=store,
        cpu_threads=args.cpu_threads,
        max_model_len=args.max_model_len,
        kv_cache_bytes=args.kv_cache_mb << 20,
    )
    restarts, swaps = [], []
    for k in range(args.restarts):
        restart, figures = one_restart(spec, dirs, args.swaps, work / f"scratch-{preset}", k)
        restarts.append(restart)
        swaps.extend(figures)
        console.print(
            f"{preset} #{k}: ready {restart['ready_s']:.2f}s, first completion "
            f"{restart['first_completion_s']:.2f}s; swaps "
            + ", ".join(f"{f['wall_s'] * 1e3:.0f}" for f in figures)
            + " ms"
        )

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    summary = {
        "restart_ready_s": med(restarts, "ready_s"),
        "restart_first_completion_s": med(restarts, "first_completion_s"),
        "swap_wall_s": med(swaps, "wall_s"),
        "swap_server_s": med(swaps, "server_s"),
        "swap_paused_s": med(swaps, "paused_s"),
        "swap_to_first_completion_s": med(swaps, "to_first_completion_s"),
    }
    summary["ratio_swap_to_restart"] = (
        summary["swap_wall_s"] / summary["restart_first_completion_s"]
    )
    summary["ratio_swap_first_to_restart_first"] = (
        summary["swap_to_first_completion_s"] / summary["restart_first_completion_s"]
    )
    return {
        "preset": preset,
        "params": params,
        "checkpoint_bytes": sum(p.stat().st_size for p in dirs[0].glob("*.safetensors")),
        "restarts": restarts,
        "swaps": swaps,
        "median": summary,
        "meets_goal": summary["ratio_swap_to_restart"] < GOAL,
    }


def _param_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                total += math.prod(f.get_slice(name).get_shape())
    return total


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    console = make_console()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pairloop-bench-swap-"))
    results = [run_preset(p, args, work, console) for p in args.presets]

    rows = []
    for r in results:
        m = r["median"]
        rows.append(
            [
                f"{r['preset']} ({r['params'] / 1e6:.1f}M)",
                f"{m['restart_ready_s']:.2f} s",
                f"{m['restart_first_completion_s']:.2f} s",
                f"{m['swap_wall_s'] * 1e3:.0f} ms",
                f"{m['swap_server_s'] * 1e3:.0f} ms",
                f"{m['swap_paused_s'] * 1e3:.0f} ms",
                f"{m['swap_to_first_completion_s'] * 1e3:.0f} ms",
                f"{100 * m['ratio_swap_to_restart']:.2f}%",
                "yes" if r["meets_goal"] else "NO",
            ]
        )
    columns = [
        "model", "restart→ready", "restart→1st", "swap", "swap (server)", "paused", "swap→1st",
        "swap/restart", f"< {GOAL:.0%}",
    ]  # fmt: skip
    title = (
        f"Generator: in-place swap vs cold restart (medians; {args.restarts} restarts x "
        f"{args.swaps} swaps)"
    )
    console.print(rich_table(title, columns, rows))
    report = {
        "benchmark": "generator_swap",
        "command": "python -m bench.generator_swap " + " ".join(argv or sys.argv[1:]),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "goal": f"median swap wall time / median restart-to-first-completion < {GOAL}",
        "results": results,
    }
    out = RESULTS / "generator_swap.json"
    atomic_write_json(out, report)
    console.print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

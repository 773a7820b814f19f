"""Run the benchmarks: `python -m bench [NAME ...]` (or `make bench`).

With no names, every CPU benchmark runs in turn with its defaults; each prints its figures and
writes bench/results/NAME.json. GPU benchmarks run only when named, on a host with CUDA.
Options for one benchmark: run it directly, `python -m bench.NAME --help`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

CPU_BENCHMARKS = (
    "generator_swap",
    "generator_throughput",
    "ranker_throughput",
    "ranker_replicas",
    "trainer_dpo",
    "trainer_memory",
    "orchestrator_overhead",
)
GPU_BENCHMARKS = ("trainer_dpo_gpu", "weights_io", "ranker_gpu_memory", "generator_sleep_gpu")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: {', '.join(CPU_BENCHMARKS)}; "
        f"GPU: {', '.join(GPU_BENCHMARKS)})",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - {*CPU_BENCHMARKS, *GPU_BENCHMARKS})
    if unknown:
        parser.error(
            f"unknown benchmark {', '.join(unknown)}; choose from "
            f"{', '.join(CPU_BENCHMARKS + GPU_BENCHMARKS)}"
        )
    failed = []
    for name in args.names or CPU_BENCHMARKS:
        print(f"\n=== bench.{name} ===", flush=True)
        module = importlib.import_module(f"bench.{name}")
        if module.main([]) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

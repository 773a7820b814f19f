"""The README's demo figures, measured by running the demo: they cannot drift from what it does.

    python -m bench.demo_figures                      # run `pairloop demo --new` (~5 min on 2 cores),
                                                      # write bench/results/demo.json, rewrite README
    python -m bench.demo_figures --from-run RUN_DIR   # the same from a finished demo run

The README's block between `<!-- demo-figures:begin -->` and `<!-- demo-figures:end -->` is
`render(bench/results/demo.json)`; tests/bench/test_demo_figures.py checks that it still is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.manifest import Manifest, load_manifest
from orchestrator.report import best_of_rows, iteration_rows
from pairloop.atomic import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "demo.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- demo-figures:begin -->", "<!-- demo-figures:end -->"


def figures(manifest: Manifest, *, seconds: float, command: str) -> dict[str, Any]:
    """What the README says of a finished demo run, from its manifest."""
    rows = [r for r in iteration_rows(manifest) if r["iteration"] > 0]
    swaps = [r["swap_seconds"] for r in rows if isinstance(r.get("swap_seconds"), (int, float))]
    best = [b for b in best_of_rows(manifest) if b["n"] > 1]
    final = manifest.stages[f"iter{manifest.iterations}.evaluate"].metrics["vs_base"]
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "seconds": round(seconds),
        "iterations": manifest.iterations,
        "eval_prompts": final.get("n"),
        "win_rate_vs_base": [round(float(r["win_rate_vs_base"]), 3) for r in rows],
        "lc_win_rate_vs_base": final.get("lc_win_rate"),
        "best_of_n": best[0]["n"] if best else None,
        "best_of_vs_base": [round(float(b["win_rate_vs_base"]), 3) for b in best],
        "swap_seconds": [min(swaps), max(swaps)] if swaps else None,
    }


def render(f: dict[str, Any]) -> str:
    """The README's figure block for `f` (bench/results/demo.json)."""
    wins = f["win_rate_vs_base"]
    after = ", ".join(f"{w:.3f} after {i}" for i, w in enumerate(wins[:-1], start=1))
    last = f"**{wins[-1]:.3f}** after {len(wins)}"
    lc = f["lc_win_rate_vs_base"]
    text = (
        f"Measured by `python -m bench.demo_figures` ({f['command']}, {f['date']}, "
        f"{f['cpus']} CPU cores, shared with other jobs): {f['seconds']} s; win rate against the "
        f"base, judged by the demo's ranker, {after + ', ' if after else ''}{last}"
        + (f" (AlpacaEval's length-controlled GLM: {lc:.3f})" if lc is not None else "")
        + f" on the {f['eval_prompts']} held-out prompts"
    )
    if f["best_of_vs_base"]:
        best = ", ".join(f"{w:.3f}" for w in f["best_of_vs_base"][:-1])
        text += (
            f"; best-of-{f['best_of_n']} of policies 0-{len(f['best_of_vs_base']) - 1}: "
            f"{best + ', ' if best else ''}**{f['best_of_vs_base'][-1]:.3f}**"
        )
    if f["swap_seconds"]:
        low, high = f["swap_seconds"]
        text += f"; each in-place swap took {low:.2f}-{high:.2f} s"
    return _wrap(text + ".")


def _wrap(text: str, width: int = 100) -> str:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def readme_block(readme: str) -> str:
    """The text between the README's markers (ValueError if they are missing)."""
    match = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), readme, flags=re.S)
    if match is None:
        raise ValueError(f"README.md has no {BEGIN} ... {END} block")
    return match.group(1)


def update_readme(f: dict[str, Any], path: Path = README) -> None:
    readme = path.read_text()
    old = readme_block(readme)
    atomic_write_text(
        path, readme.replace(f"{BEGIN}\n{old}\n{END}", f"{BEGIN}\n{render(f)}\n{END}")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-run", type=Path, help="a finished demo run directory")
    parser.add_argument("--workdir", type=Path, help="demo work directory (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.from_run is not None:
        run_dir = args.from_run
        manifest = load_manifest(run_dir)
        seconds = sum(s.seconds for s in manifest.stages.values())
        command = "figures of a finished `pairloop demo` run"
    else:
        from rich.console import Console

        from orchestrator.demo import run_demo

        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pairloop-demo-"))
        started = time.monotonic()
        run_dir, manifest = run_demo(workdir.resolve(), new=True, console=Console())
        seconds = time.monotonic() - started
        command = "`pairloop demo --new`, 3 iterations"
    if manifest.status != "completed":
        raise SystemExit(f"{run_dir}: the demo run is {manifest.status}, not completed")
    f = figures(manifest, seconds=seconds, command=command)
    atomic_write_json(RESULTS, f)
    update_readme(f)
    print(json.dumps(f, indent=2))
    print(f"wrote {RESULTS} and the README's demo figures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What is true of a run right now, read from its directory: is a process executing it, was it
started on a local stack, which command continues it, how far its running stage has got.

    executing(run_dir)          # True while an orchestrator process holds RUN_DIR/.lock
    resume_command(run_dir)     # `pairloop resume RUN_DIR --local` for a run started with --local
    stage_progress(run_dir, "iter2.generate", manifest, shard_size=64)   # "3/8 shards"

Read-only: nothing here writes to the run directory (`pairloop cancel` and `status` on a finished
run must leave it as it was).
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import time
from pathlib import Path

import yaml

from orchestrator.manifest import Manifest
from pairloop.jobs import describe_world

__all__ = [
    "executing",
    "frozen_shard_size",
    "is_local_run",
    "latest_win_rates",
    "resume_command",
    "running_stage",
    "stage_progress",
    "status_word",
    "when",
]

LOCK_FILE = ".lock"
# Written by orchestrator.local.runner when a run's local stack starts (not imported: that package
# pulls in the process machinery, and `pairloop status` should stay light).
_STACK_FILE = Path("local") / "stack.json"


def executing(run_dir: Path) -> bool:
    """True when a live process holds the run's lock (`orchestrator.runs.run_lock`).

    The kernel drops an flock when its holder dies, so a `kill -9`-ed run reads as not executing.
    The lock file is opened read-only and never created.
    """
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def is_local_run(run_dir: Path) -> bool:
    """True when the run was started on a local stack (`--local`, or `pairloop demo`)."""
    return (run_dir / _STACK_FILE).is_file()


def resume_command(run_dir: Path, *, local: bool | None = None) -> str:
    """The command that continues this run: with `--local` when it runs on a local stack."""
    if local is None:
        local = is_local_run(run_dir)
    return f"pairloop resume {run_dir}{' --local' if local else ''}"


def _lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def _shards(directory: Path) -> int:
    return len(list(directory.glob("shard-*.jsonl"))) if directory.is_dir() else 0


def stage_progress(run_dir: Path, stage: str, manifest: Manifest, *, shard_size: int) -> str:
    """How far `stage` has got: shards written of shards to make, or training steps; "" if unknown.

    Shards are counted on disk (each file is written whole, atomically); training steps come from
    the progress the train stage records in the manifest.
    """
    record = manifest.stages.get(stage)
    if stage.endswith(".train"):
        progress = record.metrics.get("progress") if record else None
        if not isinstance(progress, dict) or progress.get("step") is None:
            return ""
        total = progress.get("total_steps")
        text = f"step {progress['step']}/{total}" if total else f"step {progress['step']}"
        loss = progress.get("loss")
        text += f", loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
        machines, world = progress.get("machines"), progress.get("world_size")
        if isinstance(machines, int) and isinstance(world, int):
            text += f", {describe_world(machines, world)}"
        return text
    match = re.fullmatch(r"iter(\d+)\.(generate|rank)", stage)
    if match:
        k, what = match.groups()
        prompts = _lines(run_dir / "prompts" / f"iteration_{k}.jsonl")
        folder = run_dir / f"iter{k}" / ("generations" if what == "generate" else "rankings")
    else:
        match = re.fullmatch(r"(?:policy|iter)(\d+)\.evaluate", stage)
        if not match:
            return ""
        prompts = _lines(run_dir / "prompts" / "eval.jsonl")
        folder = run_dir / "eval" / f"policy{match.group(1)}" / "shards"
    total = math.ceil(prompts / shard_size) if prompts else 0
    return f"{_shards(folder)}/{total} shards" if total else ""


def when(epoch: float | None) -> str:
    """A local ISO time and how long ago, e.g. `2026-12-02 11:40:03 (3 min ago)`."""
    if epoch is None:
        return "-"
    ago = max(0.0, time.time() - epoch)
    span = (
        f"{ago:.0f} s"
        if ago < 90
        else f"{ago / 60:.0f} min"
        if ago < 5400
        else f"{ago / 3600:.1f} h"
        if ago < 172800
        else f"{ago / 86400:.0f} days"
    )
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(epoch))} ({span} ago)"


def latest_win_rates(m: Manifest) -> str:
    """The last evaluated policy's win rates: vs base (and LC), vs previous."""
    from orchestrator.report import iteration_rows  # matplotlib stays lazy inside report

    for r in reversed(iteration_rows(m)):
        if r.get("win_rate_vs_base") is not None:
            parts = [f"policy {r['iteration']}: {r['win_rate_vs_base']:.3f} vs base"]
            if r.get("lc_win_rate_vs_base") is not None:
                parts.append(f"LC {r['lc_win_rate_vs_base']:.3f}")
            if r.get("win_rate_vs_previous") is not None:
                parts.append(f"{r['win_rate_vs_previous']:.3f} vs previous")
            return ", ".join(parts)
    return "-"


def running_stage(run_dir: Path, m: Manifest, shard_size: int) -> str:
    """The stage recorded as running, with its progress (`iter2.rank (3/8 shards)`)."""
    for name, st in m.stages.items():
        if st.state == "running":
            progress = stage_progress(run_dir, name, m, shard_size=shard_size)
            return f"{name} ({progress})" if progress else name
    return "-"


def frozen_shard_size(run_dir: Path) -> int:
    """shard_size of the run's frozen config (its default if the file cannot be read)."""
    try:
        frozen = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        return int(frozen.get("shard_size") or 64)
    except (OSError, ValueError, yaml.YAMLError):
        return 64


def status_word(run_dir: Path, recorded: str) -> str:
    """The recorded status, corrected when it says running and no process is (a `kill -9`)."""
    if recorded == "running" and not executing(run_dir):
        return "stopped (recorded as running; no process is executing it: resume continues it)"
    return recorded

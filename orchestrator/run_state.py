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
from pathlib import Path

from orchestrator.manifest import Manifest

__all__ = ["executing", "is_local_run", "resume_command", "stage_progress"]

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
        return text + (f", loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
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

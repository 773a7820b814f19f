"""The run manifest: every stage's state, timings, artifacts and figures, in one JSON file.

The run directory is the unit of resumption. The orchestrator is the manifest's only writer and
rewrites it atomically after every change, so a `kill -9` at any moment leaves the last complete
version; readers (the status API, `pairloop status`, the report) never see a torn file.

    RUN_DIR/manifest.json
    {"run_id": ..., "status": "running", "stages": {"iter1.generate": {"state": "done", ...}}, ...}
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from pairloop.atomic import atomic_write_text

__all__ = ["MANIFEST_NAME", "Manifest", "RunStatus", "StageRecord", "StageState", "load_manifest"]

MANIFEST_NAME = "manifest.json"

StageState = Literal["pending", "running", "done", "failed"]
# interrupted: stopped by a signal (Ctrl-C, SIGTERM); `pairloop resume` continues it.
RunStatus = Literal["created", "running", "completed", "failed", "cancelled", "interrupted"]


class StageRecord(BaseModel):
    state: StageState = "pending"
    started_at: float | None = None
    finished_at: float | None = None
    seconds: float = Field(0.0, description="wall time of the finishing attempt")
    service_seconds: float = Field(
        0.0, description="time spent waiting on services in that attempt"
    )
    attempts: int = 0
    artifacts: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class Manifest(BaseModel):
    run_id: str
    config_fingerprint: str
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    status: RunStatus = "created"
    error: str | None = None
    iterations: int
    current_version: str | None = None
    stages: dict[str, StageRecord] = Field(default_factory=dict)

    # --- persistence -------------------------------------------------------------------------
    def save(self, run_dir: str | Path) -> None:
        self.updated_at = time.time()
        atomic_write_text(Path(run_dir) / MANIFEST_NAME, self.model_dump_json(indent=2) + "\n")

    # --- stages ------------------------------------------------------------------------------
    def stage(self, name: str) -> StageRecord:
        return self.stages.setdefault(name, StageRecord())

    def is_done(self, name: str) -> bool:
        return name in self.stages and self.stages[name].state == "done"

    @contextmanager
    def running(self, name: str, run_dir: str | Path) -> Iterator[StageRecord]:
        """Mark `name` running, yield its record, then mark it done (or failed, and re-raise)."""
        record = self.stage(name)
        record.state, record.error = "running", None
        record.started_at = time.time()
        record.attempts += 1
        record.service_seconds = 0.0
        self.save(run_dir)
        try:
            yield record
        except BaseException as exc:
            record.state = "failed"
            record.error = f"{type(exc).__name__}: {exc}"
            record.finished_at = time.time()
            record.seconds = record.finished_at - (record.started_at or record.finished_at)
            self.save(run_dir)
            raise
        record.state = "done"
        record.finished_at = time.time()
        record.seconds = record.finished_at - (record.started_at or record.finished_at)
        self.save(run_dir)

    def iteration_stages(self, k: int) -> dict[str, StageRecord]:
        prefix = f"iter{k}."
        return {n[len(prefix) :]: r for n, r in self.stages.items() if n.startswith(prefix)}


def load_manifest(run_dir: str | Path) -> Manifest:
    """Read RUN_DIR/manifest.json (FileNotFoundError if RUN_DIR is not a run directory)."""
    path = Path(run_dir) / MANIFEST_NAME
    return Manifest.model_validate(json.loads(path.read_text()))

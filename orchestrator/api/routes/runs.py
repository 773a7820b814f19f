"""Run status and control: list runs, show one, start one, cancel one."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, status
from starlette.concurrency import run_in_threadpool

from orchestrator.api.deps import AdminDep, RunsRootDep
from orchestrator.api.schemas import RunDetail, RunStartRequest, RunSummary
from orchestrator.config import ConfigError
from orchestrator.context import CANCEL_FILE
from orchestrator.loop import create_run
from orchestrator.manifest import MANIFEST_NAME, Manifest, load_manifest
from orchestrator.report import iteration_rows
from orchestrator.runs import new_run_id
from pairloop.atomic import atomic_write_text
from pairloop.errors import ConflictError, NotFoundError, ValidationError
from pairloop.http import error_responses
from pairloop.paths import resolve_inside
from pairloop_local.processes import spawn_detached

router = APIRouter(prefix="/runs", tags=["runs"])


def _summary(m: Manifest) -> dict[str, Any]:
    return {
        "run_id": m.run_id,
        "status": m.status,
        "stages_done": sum(1 for s in m.stages.values() if s.state == "done"),
        "stages_total": len(m.stages),
        "current_version": m.current_version,
        "updated_at": m.updated_at,
        "error": m.error,
    }


def _run_dir(runs_root: Path, run_id: str) -> Path:
    path = resolve_inside(runs_root, run_id, param="run_id")
    if not (path / MANIFEST_NAME).is_file():
        raise NotFoundError(f"no run {run_id!r} under {runs_root}", param="run_id")
    return path


@router.get("", response_model=list[RunSummary])
async def list_runs(runs_root: RunsRootDep) -> list[dict[str, Any]]:
    return [_summary(load_manifest(p.parent)) for p in sorted(runs_root.glob(f"*/{MANIFEST_NAME}"))]


@router.get("/{run_id}", response_model=RunDetail, responses=error_responses(404))
async def get_run(run_id: str, runs_root: RunsRootDep) -> dict[str, Any]:
    m = load_manifest(_run_dir(runs_root, run_id))
    return {
        **_summary(m),
        "stages": {name: st.model_dump() for name, st in m.stages.items()},
        "iterations": iteration_rows(m),
    }


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RunSummary,
    responses=error_responses(400, 401, 403, 409, 503),
)
async def start_run(body: RunStartRequest, runs_root: RunsRootDep, _: AdminDep) -> dict[str, Any]:
    """Validate the config, create the run, and execute it in a detached `pairloop execute`
    process (a session of its own: it outlives this API, and `cancel` stops it)."""
    configs = runs_root / "_configs"
    name = body.run_id or new_run_id("api")
    config_path = configs / f"{name}.yaml"
    atomic_write_text(config_path, yaml.safe_dump(body.config, sort_keys=False))
    try:
        # Prompt admission tokenizes every prompt: seconds to minutes, off the event loop.
        run_dir = await run_in_threadpool(create_run, config_path, run_id=name)
    except ConfigError as exc:
        config_path.unlink(missing_ok=True)
        if "already exists" in str(exc):
            raise ConflictError(str(exc), param="run_id") from None
        raise ValidationError(str(exc), param="config") from None
    if run_dir.parent.resolve() != runs_root.resolve():
        raise ValidationError(
            f"the config's model_store puts runs under {run_dir.parent}, but this API serves "
            f"{runs_root}; set model_store accordingly",
            param="config.model_store",
        )
    spawn_detached(
        [sys.executable, "-m", "orchestrator", "execute", str(run_dir)],
        log_path=run_dir / "orchestrator.log",
    )
    return _summary(load_manifest(run_dir))


@router.post(
    "/{run_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RunSummary,
    responses=error_responses(401, 403, 404, 409, 503),
)
async def cancel_run(run_id: str, runs_root: RunsRootDep, _: AdminDep) -> dict[str, Any]:
    run_dir = _run_dir(runs_root, run_id)
    m = load_manifest(run_dir)
    if m.status in ("completed", "failed", "cancelled", "interrupted"):
        raise ConflictError(f"run {run_id} is already {m.status}", param="run_id")
    atomic_write_text(run_dir / CANCEL_FILE, "cancel requested through the API\n")
    return _summary(m)

"""Run state that stays true: cancel, resume and status never rewrite what a run did, and every
piece of advice names the command that works for that run (`--local` for a local one)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, DPOHyperparameters, config_fingerprint
from orchestrator.manifest import load_manifest
from orchestrator.runs import FROZEN_CONFIG, create_run, load_run, run_lock
from pairloop_local.processes import free_port


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
    )


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def dead_run(write_config: Callable[..., Path]) -> Path:
    """A created run whose services are nowhere (a closed port, no retries)."""
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_config(
        services={"generator_urls": [dead], "ranker_url": dead, "retries": 0},
    )
    return create_run(config, run_id="state")


def _finish(run_dir: Path, status: str) -> None:
    """Record the run as the loop would have left it: stages done, the given status."""
    m = load_manifest(run_dir)
    for name in ("policy0.evaluate", "iter1.generate", "iter1.rank"):
        m.stage(name).state = "done"
    m.stage("iter1.evaluate").metrics = {"vs_base": {"win_rate": 0.61, "lc_win_rate": 0.58}}
    m.stages["iter1.evaluate"].state = "done"
    m.status = status
    m.save(run_dir)


def test_cancel_without_a_live_process_says_so_and_writes_nothing(dead_run: Path) -> None:
    _finish(dead_run, "completed")
    before = _snapshot(dead_run)
    done = run_cli("cancel", str(dead_run))
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "no process is executing" in line and "status: completed" in line, line
    assert not (dead_run / "CANCEL").exists()
    assert _snapshot(dead_run) == before

    _finish(dead_run, "failed")
    (dead_run / "local").mkdir()
    (dead_run / "local" / "stack.json").write_text("{}")
    done = run_cli("cancel", str(dead_run))
    assert done.returncode == 1
    assert f"`pairloop resume {dead_run} --local` would continue it" in done.stderr
    assert not (dead_run / "CANCEL").exists()


def test_cancel_reaches_a_run_whose_process_holds_its_lock(dead_run: Path) -> None:
    _finish(dead_run, "running")
    with run_lock(dead_run):  # this test process plays the executing orchestrator
        done = run_cli("cancel", str(dead_run))
    assert done.returncode == 0, done.stderr
    assert "cancel requested" in done.stdout
    assert (dead_run / "CANCEL").is_file()


def test_resume_of_a_completed_run_changes_nothing(dead_run: Path) -> None:
    _finish(dead_run, "completed")
    (dead_run / "CANCEL").write_text("left over\n")
    before = _snapshot(dead_run)
    done = run_cli("resume", str(dead_run))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is complete" in done.stdout and "nothing to resume" in done.stdout
    assert _snapshot(dead_run) == before  # no service reached, no file touched


@pytest.mark.parametrize("status", ["interrupted", "cancelled", "failed"])
def test_a_failed_service_check_on_resume_leaves_the_status(dead_run: Path, status: str) -> None:
    _finish(dead_run, status)
    m = load_manifest(dead_run)
    m.error = "the earlier reason"
    m.save(dead_run)
    done = run_cli("resume", str(dead_run))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Connection refused" in done.stderr or "refused" in done.stderr.lower()
    after = load_manifest(dead_run)
    assert (after.status, after.error) == (status, "the earlier reason")
    assert after.stages["iter1.generate"].state == "done"


def test_advice_names_local_for_a_run_started_on_a_local_stack(dead_run: Path) -> None:
    _finish(dead_run, "interrupted")
    (dead_run / "local").mkdir()
    (dead_run / "local" / "stack.json").write_text("{}")
    done = run_cli("resume", str(dead_run))  # without --local: its config's services are dead
    assert done.returncode == 1
    line = done.stderr.strip().splitlines()[-1]
    assert f"`pairloop resume {dead_run} --local` continues it" in line, line


def test_resume_refuses_a_run_another_process_executes_and_keeps_its_cancel(
    dead_run: Path,
) -> None:
    _finish(dead_run, "running")
    (dead_run / "CANCEL").write_text("cancel requested\n")
    with run_lock(dead_run):
        done = run_cli("resume", str(dead_run))
    assert done.returncode == 2
    assert "being executed by another process" in done.stderr
    assert (dead_run / "CANCEL").is_file()  # the live run's pending cancel is not swallowed


def test_status_shows_times_progress_and_win_rates(dead_run: Path) -> None:
    _finish(dead_run, "running")
    m = load_manifest(dead_run)
    m.stage("iter2.generate").state = "running"
    m.stage("iter1.train").state = "done"
    m.save(dead_run)
    shards = dead_run / "iter2" / "generations"
    shards.mkdir(parents=True)
    (shards / "shard-00000.jsonl").write_text("{}\n")  # 1 of ceil(10 / 4) = 3 shards written

    done = run_cli("status", str(dead_run))
    assert done.returncode == 0, done.stderr
    assert "1/3 shards" in done.stdout
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+ s ago\)", done.stdout), done.stdout
    assert "policy 1: 0.610 vs base, LC 0.580" in done.stdout
    # Recorded as running, but nothing holds its lock: status says so instead of "running".
    assert "no process is executing it" in done.stdout

    listing = run_cli("status", "--runs-root", str(dead_run.parent))
    assert listing.returncode == 0, listing.stderr
    assert "iter2.generate (1/3 shards)" in listing.stdout
    assert "0.610 vs base" in listing.stdout and "ago)" in listing.stdout


def test_status_shows_the_training_step_of_the_running_stage(dead_run: Path) -> None:
    m = load_manifest(dead_run)
    m.stage("iter1.train").state = "running"
    m.stages["iter1.train"].metrics["progress"] = {"step": 3, "total_steps": 8, "loss": 0.6931}
    m.save(dead_run)
    done = run_cli("status", str(dead_run))
    assert "step 3/8, loss 0.6931" in done.stdout, done.stdout


def test_status_says_machines_and_ranks_of_a_multi_machine_job(dead_run: Path) -> None:
    m = load_manifest(dead_run)
    m.stage("iter1.train").state = "running"
    m.stages["iter1.train"].metrics["progress"] = {
        "step": 3,
        "total_steps": 8,
        "loss": 0.6931,
        "machines": 2,
        "world_size": 16,
    }
    m.save(dead_run)
    done = run_cli("status", str(dead_run))
    assert "step 3/8, loss 0.6931, 2 machines x 8 ranks" in done.stdout, done.stdout


def test_status_of_a_runs_root_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    done = run_cli("status", "--runs-root", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "nowhere is not a directory" in line and "--runs-root" in line


def test_run_files_are_readable_like_the_plots(dead_run: Path) -> None:
    from orchestrator.report import write_report

    write_report(dead_run, load_manifest(dead_run))
    umask_mode = 0o666 & ~_umask()
    for path in ("manifest.json", "config.yaml", "report/report.md", "report/win_rates.png"):
        assert stat.S_IMODE((dead_run / path).stat().st_mode) == umask_mode, path
    assert json.loads((dead_run / "manifest.json").read_text())["run_id"] == "state"


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# --- the frozen config's fingerprint: edits refused, a newer pairloop's new fields are not edits --


def test_a_run_frozen_before_a_field_existed_still_loads(dead_run: Path) -> None:
    """A field added to RunConfig after the run started (absent from its frozen file, so it takes
    its default) is no edit: the run loads, with the same fingerprint."""
    frozen = dead_run / FROZEN_CONFIG
    raw = yaml.safe_load(frozen.read_text())
    del raw["dpo"]["beta"]  # as if `beta` had been added in a later version
    del raw["sampling"]
    # The manifest's fingerprint as the older version computed it, over the file it froze.
    manifest = load_manifest(dead_run)
    manifest.config_fingerprint = config_fingerprint(raw)
    manifest.save(dead_run)
    frozen.write_text(yaml.safe_dump(raw, sort_keys=False))

    cfg, loaded = load_run(dead_run)
    assert loaded.config_fingerprint == config_fingerprint(raw)
    assert cfg.dpo.beta == DPOHyperparameters().beta


def test_an_edited_frozen_config_is_refused(dead_run: Path) -> None:
    frozen = dead_run / FROZEN_CONFIG
    raw = yaml.safe_load(frozen.read_text())
    raw["dpo"]["beta"] = raw["dpo"]["beta"] * 2
    frozen.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError, match="edited after the run started"):
        load_run(dead_run)

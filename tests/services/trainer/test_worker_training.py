"""A real Celery worker trains tiny models: full fine-tuning, resubmission, LoRA, bad input.

One worker process serves the whole module (real Redis, prefork pool, a fresh child per job).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from pairloop.checkpoints import COMPLETE_MARKER, compare_checkpoints, read_manifest
from pairloop.jobs import TrainResult
from pairloop.preference_data import write_preference_split
from pairloop.train_client import make_train_client, read_train_state

from .helpers import Worker, make_job, preference_rows, wait_for_task


def weights_differ(a: Path, b: Path) -> list[str]:
    """Names of the tensors whose values differ between two single-file checkpoints."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return [name for name in wa if not (wa[name] == wb[name]).all()]


def test_worker_trains_publishes_and_reports_progress(worker: Worker, model_store: Path) -> None:
    job = make_job("full")
    observed = wait_for_task(worker.submit(job), timeout=240, worker=worker)
    assert observed.final.state == "SUCCESS", observed.final.error
    result = observed.final.result
    assert result is not None and not result.reused

    # Progress: the client saw training steps with DPO metrics, and every later phase.
    training = [p for p in observed.progress if p.phase == "training" and p.step > 0]
    assert training, f"no training progress seen: {observed.progress}"
    assert all(p.total_steps == 8 for p in training)
    assert any(p.loss is not None and p.rewards_margins is not None for p in training)
    assert "PROGRESS" in observed.states

    # Result: finite loss, DPO metrics, timings, and the checkpoint where the job said.
    assert result.steps == 8 and result.resumed_from_step == 0
    assert math.isfinite(result.metrics["loss"]) and math.isfinite(result.metrics["train_loss"])
    assert 0.0 <= result.metrics["rewards/accuracies"] <= 1.0
    assert result.metrics["rewards/margins"] > 0  # the curt answer lost
    assert {"prepare", "load", "train", "save", "validate", "publish"} <= set(result.timings)
    output = model_store / "out" / "full"
    assert result.checkpoint_path == str(output)
    assert (output / COMPLETE_MARKER).is_file()

    # Weights: same names and shapes as the policy (swappable), different values (trained).
    assert compare_checkpoints(read_manifest(model_store / "base"), read_manifest(output)) == []
    assert weights_differ(model_store / "base", output)
    # Trainer checkpoints are cleaned up once published; no staging directory is left.
    assert not (model_store / ".pairloop-trainer" / job.job_id).exists()
    assert not list((model_store / "out").glob(".*staging*"))

    # Any Celery client reads the same result by job id.
    other = make_train_client(worker.redis_url, visibility_timeout=3600)
    try:
        seen = read_train_state(other.AsyncResult(job.job_id))
        assert seen.state == "SUCCESS" and seen.result == result
    finally:
        other.close()

    # The same job again: the stored result, no training, the published files untouched.
    mtime = (output / "model.safetensors").stat().st_mtime_ns
    again = wait_for_task(worker.submit(job), timeout=120, worker=worker)
    assert again.final.state == "SUCCESS", again.final.error
    reused = again.final.result
    assert reused.reused and reused.checkpoint_path == result.checkpoint_path
    assert reused.metrics == result.metrics and reused.steps == result.steps
    assert not [p for p in again.progress if p.phase == "training"]
    assert (output / "model.safetensors").stat().st_mtime_ns == mtime


def test_worker_trains_lora_and_publishes_merged_weights_and_adapter(
    worker: Worker, model_store: Path
) -> None:
    job = make_job("lora", lora={"r": 8, "alpha": 16, "dropout": 0.0})
    observed = wait_for_task(worker.submit(job), timeout=240, worker=worker)
    assert observed.final.state == "SUCCESS", observed.final.error
    result: TrainResult = observed.final.result
    output = model_store / "out" / "lora"
    assert result.adapter_path == str(output / "adapter")
    assert (output / "adapter" / "adapter_config.json").is_file()
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    # Merged full weights: the policy's exact tensor set (no lora_ names), changed values.
    assert compare_checkpoints(read_manifest(model_store / "base"), read_manifest(output)) == []
    changed = weights_differ(model_store / "base", output)
    assert changed and all("proj" in name for name in changed)
    assert math.isfinite(result.metrics["loss"])


def _write_raw_split(root: Path, lines: list[str]) -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "train.jsonl").write_text("".join(line + "\n" for line in lines))
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train_iteration_1\n    path: data/train.jsonl\n---\n"
    )


@pytest.fixture(scope="module")
def bad_datasets(model_store: Path) -> Path:
    import json

    root = model_store / "bad"
    _write_raw_split(root / "empty", [])
    rows = preference_rows(3)
    _write_raw_split(
        root / "no-rejected",
        [json.dumps({k: v for k, v in r.items() if k != "rejected"}) for r in rows],
    )
    broken = [dict(r) for r in rows]
    broken[1]["chosen"] = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]
    _write_raw_split(root / "bad-role", [json.dumps(r) for r in broken])
    return root


BAD_JOBS = [
    pytest.param(
        "missing-fields",
        {"run_id": "bad-missing", "iteration": 1, "policy_path": "base", "reference_path": "base"},
        ["invalid training job", "dataset_path: Field required", "output_path: Field required"],
        id="job-missing-fields",
    ),
    pytest.param(
        "no-dataset",
        {"dataset_path": "data/does-not-exist"},
        ["dataset_path", "does not exist"],
        id="dataset-path-missing",
    ),
    pytest.param("empty", {"dataset_path": "bad/empty"}, ["is empty"], id="empty-dataset"),
    pytest.param(
        "no-rejected",
        {"dataset_path": "bad/no-rejected"},
        ["missing column(s) ['rejected']"],
        id="missing-columns",
    ),
    pytest.param(
        "bad-role",
        {"dataset_path": "bad/bad-role"},
        ["row 1 (prompt_id 'p1')", "chosen[1] has role 'bot'"],
        id="malformed-messages",
    ),
    pytest.param(
        "outside",
        {"output_path": "/tmp/escaped-the-store"},
        ["output_path", "outside the model store root"],
        id="output-outside-store",
    ),
    pytest.param(
        "escape",
        {"policy_path": "../base"},
        ["policy_path", "outside the model store root"],
        id="policy-escapes-store",
    ),
]


@pytest.mark.parametrize(("name", "overrides", "expected"), BAD_JOBS)
def test_bad_input_fails_with_a_clear_error_and_publishes_nothing(
    worker: Worker,
    model_store: Path,
    bad_datasets: Path,
    name: str,
    overrides: dict,
    expected: list[str],
) -> None:
    if name == "missing-fields":
        payload, task_id = overrides, f"bad-{name}"
    else:
        job = make_job(f"bad-{name}").model_dump(mode="json") | overrides
        payload, task_id = job, f"bad-{name}-iter1"
    observed = wait_for_task(worker.submit_raw(payload, task_id), timeout=120, worker=worker)
    assert observed.final.state == "FAILURE"
    for fragment in expected:
        assert fragment in observed.final.error, observed.final.error
    assert not (model_store / "out" / f"bad-{name}").exists()
    assert (
        not list((model_store / "out").glob(f".bad-{name}*"))
        if (model_store / "out").exists()
        else True
    )
    assert not Path("/tmp/escaped-the-store").exists()


def test_worker_keeps_serving_after_failures(worker: Worker, model_store: Path) -> None:
    # Runs after the bad-input cases in this module: the same worker still trains a job.
    write_preference_split(model_store / "data" / "after", "train_iteration_1", preference_rows(8))
    job = make_job("after-failures", dataset_path="data/after")
    job.hyperparameters.max_steps = 2
    observed = wait_for_task(worker.submit(job), timeout=240, worker=worker)
    assert observed.final.state == "SUCCESS", observed.final.error
    assert observed.final.result.steps == 2
    assert (model_store / "out" / "after-failures" / COMPLETE_MARKER).is_file()
    assert worker.process.alive()

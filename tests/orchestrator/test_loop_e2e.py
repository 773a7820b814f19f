"""The whole loop through real services: the embedded stack (vLLM generator, ranker, Celery worker,
Redis) and the `pairloop` CLI as a real process, killed with SIGKILL and resumed.

The reference run uses the demo's own config (3 iterations, the shipped prompts, the plain-prose
scorer), so it also proves the demo's claim: the final policy beats the base, judged by the ranker.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import httpx
import pytest
import yaml
from safetensors.torch import load_file

from orchestrator.demo import demo_config
from orchestrator.manifest import load_manifest
from pairloop.preference_data import PREFERENCE_COLUMNS, load_rows, read_split_names, split_path
from pairloop_local.processes import free_port

pytestmark = pytest.mark.timeout(900)


def write_run_config(stack, tmp: Path, name: str, **changes: object) -> Path:
    cfg = demo_config(
        store=stack.spec.store,
        base_model=stack.spec.base_model,
        generator_url=stack.generator_url,
        ranker_url=stack.ranker_url,
        redis_url=stack.redis_url,
        iterations=3,
    )
    # One shard in flight at a time: the engine then sees the same batches in every run, which is
    # what makes an interrupted run's samples equal an uninterrupted one's.
    cfg["services"]["concurrency"] = 1
    for key, value in changes.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def pairloop(
    stack, *args: str, fault: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN=stack.admin_token,
        PAIRLOOP_REDIS_URL=stack.redis_url,
        COLUMNS="200",
    )
    env.pop("PAIRLOOP_ORCHESTRATOR_FAULT_KILL_AFTER", None)
    if fault:
        env["PAIRLOOP_ORCHESTRATOR_FAULT_KILL_AFTER"] = fault
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def generator_version(stack) -> str:
    return httpx.get(f"{stack.generator_url}/v1/models", timeout=30).json()["data"][0][
        "weight_version"
    ]


def dataset_rows(run_dir: Path, split: str) -> list[dict]:
    return load_rows(split_path(run_dir / "dataset", split))


@pytest.fixture(scope="module")
def reference_run(stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = write_run_config(stack, tmp_path_factory.mktemp("ref"), "reference")
    done = pairloop(stack, "run", str(config), "--run-id", "reference")
    assert done.returncode == 0, done.stdout + done.stderr
    return stack.spec.store / "runs" / "reference"


def test_three_iterations_end_to_end(stack, reference_run: Path, tmp_path: Path) -> None:
    m = load_manifest(reference_run)
    assert m.status == "completed"
    assert all(st.state == "done" for st in m.stages.values())

    # Datasets: Snorkel columns, the recipe's split names, loadable with `datasets`.
    splits = read_split_names(reference_run / "dataset")
    assert {f"train_iteration_{k}" for k in (1, 2, 3)} <= set(splits)
    train1 = datasets.load_dataset(
        str(reference_run / "dataset"), split="train_iteration_1", cache_dir=str(tmp_path / "hf")
    )
    assert tuple(train1.column_names) == PREFERENCE_COLUMNS
    row = train1[0]
    assert row["chosen"][0] == {"role": "user", "content": row["prompt"]}
    assert row["chosen"][1]["role"] == "assistant" and len(row["all_rm_scores"]) >= 2

    # Every iteration generated with the previous policy's weights, and swapped to new ones.
    for k in (1, 2, 3):
        versions = {
            json.loads(line)["weight_version"]
            for shard in (reference_run / f"iter{k}" / "generations").glob("shard-*.jsonl")
            for line in shard.read_text().splitlines()
        }
        assert versions == {f"reference.policy{k - 1}"}
        assert m.stages[f"iter{k}.swap"].metrics["version"] == f"reference.policy{k}"
    assert generator_version(stack) == "reference.policy3"

    # Weights change every iteration (and stay shape-compatible with the base).
    weights = [load_file(stack.spec.base_model / "model.safetensors")] + [
        load_file(reference_run / "checkpoints" / f"policy{k}" / "model.safetensors")
        for k in (1, 2, 3)
    ]
    name = "model.layers.0.mlp.down_proj.weight"
    for before, after in itertools.pairwise(weights):
        assert before[name].shape == after[name].shape
        assert not (before[name] == after[name]).all()

    # The manifest records how each step's batch was made (one CPU process here).
    train = m.stages["iter1.train"].metrics
    assert train["world_size"] == 1 and train["strategy"] == "single-process"
    assert train["global_batch_size"] == (
        train["per_device_train_batch_size"] * train["gradient_accumulation_steps"]
    )
    # ... and which loss made the figures: DPO with its reference (the report says so too).
    assert train["loss"] == {"loss_type": "sigmoid", "beta": 0.1}
    assert "Training loss: `sigmoid (beta 0.1)`" in (reference_run / "report" / "report.md").read_text()

    # Evaluation figures, AlpacaEval outputs and the report exist; the policy moved toward the
    # ranker's preference (the demo's claim).
    final = m.stages["iter3.evaluate"].metrics
    assert 0.0 <= final["vs_previous"]["win_rate"] <= 1.0
    assert final["vs_base"]["win_rate"] > 0.5, final
    alpaca = json.loads(
        (reference_run / "eval" / "policy3" / "alpaca_eval_outputs.json").read_text()
    )
    assert {"instruction", "output", "generator"} <= set(alpaca[0]) and len(alpaca) == 64
    report = (reference_run / "report" / "report.md").read_text()
    assert "Status: **completed**" in report
    for png in ("win_rates.png", "scores.png", "lengths.png", "dpo_metrics.png", "stage_times.png"):
        assert (reference_run / "report" / png).stat().st_size > 1000


def test_kill_and_resume_at_three_points(stack, reference_run: Path, tmp_path: Path) -> None:
    config = write_run_config(stack, tmp_path, "crash", iterations=1)
    run_dir = stack.spec.store / "runs" / "crash"
    gen_dir, rank_dir = run_dir / "iter1" / "generations", run_dir / "iter1" / "rankings"

    first = pairloop(stack, "run", str(config), "--run-id", "crash", fault="iter1.generate:1")
    assert first.returncode == -9, first.stdout + first.stderr
    assert load_manifest(run_dir).stages["iter1.generate"].state == "running"
    assert sorted(p.name for p in gen_dir.iterdir()) == ["shard-00000.jsonl"]
    first_shard = (gen_dir / "shard-00000.jsonl").stat()

    second = pairloop(stack, "resume", str(run_dir), fault="iter1.rank:1")
    assert second.returncode == -9, second.stdout + second.stderr
    m = load_manifest(run_dir)
    assert m.stages["iter1.generate"].state == "done" and m.stages["iter1.rank"].state == "running"
    assert len(list(gen_dir.glob("shard-*.jsonl"))) == 3
    assert (
        gen_dir / "shard-00000.jsonl"
    ).stat().st_mtime_ns == first_shard.st_mtime_ns  # not redone
    assert sorted(p.name for p in rank_dir.iterdir()) == ["shard-00000.jsonl"]

    third = pairloop(stack, "resume", str(run_dir), fault="iter1.train:2")
    assert third.returncode == -9, third.stdout + third.stderr
    assert load_manifest(run_dir).stages["iter1.train"].state == "running"

    last = pairloop(stack, "resume", str(run_dir))
    assert last.returncode == 0, last.stdout + last.stderr
    m = load_manifest(run_dir)
    assert m.status == "completed" and m.stages["iter1.generate"].attempts == 2

    # Nothing lost, nothing duplicated, and the same artifacts as the uninterrupted run.
    for split in ("train_iteration_1", "test_iteration_1"):
        crashed, reference = dataset_rows(run_dir, split), dataset_rows(reference_run, split)
        ids = [r["prompt_id"] for r in crashed]
        assert len(ids) == len(set(ids))
        assert crashed == reference
    ours = load_file(run_dir / "checkpoints" / "policy1" / "model.safetensors")
    theirs = load_file(reference_run / "checkpoints" / "policy1" / "model.safetensors")
    assert all((ours[k] == theirs[k]).all() for k in theirs)


def test_failed_swap_stops_the_run_and_old_weights_keep_serving(stack, tmp_path: Path) -> None:
    # A "base model" whose shapes do not match the running model: the swap must be refused.
    import shutil

    bad = stack.spec.store / "models" / "wrong-shape"
    shutil.copytree(stack.spec.base_model, bad, dirs_exist_ok=True)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    from safetensors.torch import save_file

    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    before = generator_version(stack)
    config = write_run_config(stack, tmp_path, "badswap", base_model=str(bad), iterations=1)
    done = pairloop(stack, "run", str(config), "--run-id", "badswap")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "model.norm.weight" in out and "Traceback" not in out
    assert load_manifest(stack.spec.store / "runs" / "badswap").status == "failed"
    assert generator_version(stack) == before
    reply = httpx.post(
        f"{stack.generator_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["weight_version"] == before


def test_ranker_down_is_retried_then_fails_clearly(stack, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_run_config(
        stack, tmp_path, "noranker", iterations=1, services={"ranker_url": dead, "retries": 2}
    )
    done = pairloop(stack, "run", str(config), "--run-id", "noranker")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert f"ranker at {dead} failed 3 times" in out and "Traceback" not in out
    m = load_manifest(stack.spec.store / "runs" / "noranker")
    assert m.status == "failed" and "ranker" in (m.error or "")

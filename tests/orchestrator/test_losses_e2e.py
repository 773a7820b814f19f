"""One loop run per new loss family on the embedded stack (real vLLM generator, ranker, Celery
worker), 1 iteration on a small slice: SPPO trains on the ranker's win probabilities, SimPO with no
reference model; each records its loss in the manifest and the report, and `pairloop compare`
puts the two finished runs side by side. (DPO, the loss with a reference, is test_loop_e2e's.)"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.demo import demo_config
from orchestrator.manifest import load_manifest
from pairloop.preference_data import load_rows, split_path

pytestmark = pytest.mark.timeout(900)


def run_loss(stack, tmp: Path, loss: str) -> Path:
    cfg = demo_config(
        store=stack.spec.store,
        base_model=stack.spec.base_model,
        generator_url=stack.generator_url,
        ranker_url=stack.ranker_url,
        redis_url=stack.redis_url,
        iterations=1,
        loss=loss,
    )
    cfg["prompts"].update(per_iteration=24, eval_prompts=16)
    cfg["shard_size"] = 24
    cfg["evaluation"]["best_of"] = [1]
    cfg["dpo"]["num_train_epochs"] = 1
    path = tmp / f"{loss}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ,
        "PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN": stack.admin_token,
        "PAIRLOOP_REDIS_URL": stack.redis_url,
    }
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(path), "--run-id", f"loss-{loss}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return stack.spec.store / "runs" / f"loss-{loss}"


@pytest.fixture(scope="module")
def runs(stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("losses")
    return {loss: run_loss(stack, tmp, loss) for loss in ("sppo", "simpo")}


@pytest.mark.parametrize("loss", ["sppo", "simpo"])
def test_the_run_trains_with_the_loss_and_records_it(runs: dict[str, Path], loss: str) -> None:
    run_dir = runs[loss]
    m = load_manifest(run_dir)
    assert m.status == "completed"
    train = m.stages["iter1.train"].metrics
    assert train["loss"]["loss_type"] == loss
    assert math.isfinite(train[f"dpo/loss/{loss}"])
    report = (run_dir / "report" / "report.md").read_text()
    assert f"Training loss: `{loss} (beta " in report
    rows = load_rows(split_path(run_dir / "dataset", "train_iteration_1"))
    # The ranker's full mode gave every answer a win probability; the pairs carry theirs.
    for row in rows:
        probs = row["all_win_probs"]
        assert len(probs) == len(row["all_generated_responses"])
        chosen = row["all_generated_responses"].index(row["chosen"][1]["content"])
        rejected = row["all_generated_responses"].index(row["rejected"][1]["content"])
        assert (row["chosen_win_prob"], row["rejected_win_prob"]) == (
            probs[chosen],
            probs[rejected],
        )
        assert row["chosen_win_prob"] > row["rejected_win_prob"]
    if loss == "simpo":
        assert train["loss"]["simpo_gamma"] == 0.25


def test_compare_puts_the_finished_runs_side_by_side(runs: dict[str, Path], tmp_path: Path) -> None:
    from orchestrator.cli import main

    assert main(["compare", str(runs["sppo"]), str(runs["simpo"]), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "compare.md").read_text()
    assert "| loss-sppo | sppo (beta 0.1) | 1 |" in table
    assert "| loss-simpo | simpo (beta 2.5, simpo_gamma 0.25) | 1 |" in table
    assert (tmp_path / "win_rate_vs_length.png").stat().st_size > 1000

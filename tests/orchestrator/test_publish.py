"""The final policy's model card (written whether or not it is pushed) and `push_to_hub`, which
offline fails in one line after the card is written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from orchestrator.manifest import load_manifest
from orchestrator.publish import write_model_card
from orchestrator.runs import create_run, load_run


def _finished_run(write_config: Callable[..., Path], store: Path, *overrides: str) -> Path:
    run_dir = create_run(write_config(), run_id="pub", overrides=list(overrides))
    shutil.copytree(store / "models" / "base", run_dir / "checkpoints" / "policy2")
    m = load_manifest(run_dir)
    for k in (1, 2):
        m.stage(f"iter{k}.pairs").metrics = {"pairs": 8 + k}
        m.stage(f"iter{k}.train").metrics = {"dpo/train_loss": 0.6, "dpo/eval_loss": 0.65}
        st = m.stage(f"iter{k}.evaluate")
        st.state = "done"
        st.metrics = {
            "judge": "scorer plain_prose",
            "judge_is_run_ranker": True,
            "vs_base": {"win_rate": 0.5 + 0.1 * k, "lc_win_rate": 0.55},
            "mean_length": 30.0,
        }
    m.status = "completed"
    m.save(run_dir)
    return run_dir


def test_model_card_names_base_recipe_iterations_win_rates_and_datasets(
    write_config: Callable[..., Path], store: Path
) -> None:
    run_dir = _finished_run(
        write_config,
        store,
        "push_to_hub.model_id=me/pairloop-dpo",
        "push_to_hub.dataset_id=me/pairs",
    )
    cfg, m = load_run(run_dir)
    card = write_model_card(run_dir, cfg, m)
    assert card == run_dir / "checkpoints" / "policy2" / "README.md"
    text = card.read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert (
        meta["base_model"] == "base" and meta["datasets"] == ["me/pairs"] and "dpo" in meta["tags"]
    )
    assert "# me/pairloop-dpo" in text and "after 2 iterations" in text
    assert "beta 0.01" in text and "scorer plain_prose, the run's own ranker" in text
    assert "| 2 | 10 | 0.6000 | 0.6500 | - | 0.700 | 0.550 | 30.0 |" in text
    assert "`me/pairs`, splits `train_iteration_k`" in text


def test_push_offline_fails_in_one_line_after_writing_the_card(
    write_config: Callable[..., Path], store: Path, tmp_path: Path
) -> None:
    run_dir = _finished_run(write_config, store, "push_to_hub.model_id=me/pairloop-dpo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"})
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "push", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "the hub is off (HF_HUB_OFFLINE); model me/pairloop-dpo was not uploaded" in line
    assert f"pairloop push {run_dir}" in line
    assert (run_dir / "checkpoints" / "policy2" / "README.md").is_file()

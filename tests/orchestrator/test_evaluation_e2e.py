"""Evaluation as the seed measured it, through the real stack: one small run (1 iteration) whose
evaluation instructions come from a local AlpacaEval-format file, with best-of-3, judged by a
second ranker process (the same plain-prose scorer, so its preference is known).

It proves, in one run and one resume: the outputs hold exactly the file's instructions in
AlpacaEval's format; the training slices and datasets contain none of them; best-of-n's picks are
the scorer's argmax among the samples drawn and its win rate is at least best-of-1's; the separate
judge is the one called for every comparison (its /metrics), and the run's ranker for none; a
best-of-n shard lost mid-stage is redone on resume, and only it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import SecretStr
from rich.console import Console

from orchestrator.demo import DEMO_RANKER_ARGS, demo_config
from orchestrator.loop import create_run, execute_run
from orchestrator.manifest import load_manifest
from orchestrator.prompts import normalise_instruction, read_prompts
from orchestrator.settings import OrchestratorSettings
from pairloop.preference_data import load_rows, read_split_names, split_path
from pairloop_local.processes import ManagedProcess, free_port
from services.ranker.score_functions import plain_prose

pytestmark = pytest.mark.timeout(900)

BEST_OF = 3


def counter(metrics_text: str, name: str, route: str) -> float:
    """A Prometheus counter's value for one route label (0 when never incremented)."""
    pattern = rf'^{name}\{{route="{re.escape(route)}"\}} ([0-9.e+]+)$'
    found = re.search(pattern, metrics_text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def items(url: str, route: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return counter(text, "pairloop_ranker_items_total", route)


@pytest.fixture()
def judge(tmp_path: Path):
    """A second ranker service: the evaluation's judge."""
    port = free_port()
    proc = ManagedProcess(
        "judge",
        [sys.executable, "-m", "services.ranker", "--port", str(port), *DEMO_RANKER_ARGS],
        log_path=tmp_path / "judge.log",
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).start()
    try:
        proc.wait_ready(f"http://127.0.0.1:{port}/ready", timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def alpaca_eval_file(path: Path) -> list[dict[str, Any]]:
    """16 instructions in AlpacaEval's format, all also in the demo's training prompts (some
    spelled with other case and spacing), so only the exclusion keeps them out of training."""
    demo = [json.loads(line) for line in Path(demo_prompts()).read_text().splitlines()]
    rows = []
    for i, p in enumerate(demo[:16]):
        text = p["prompt"] if i % 3 else "  " + p["prompt"].upper().replace(" ", "  ")
        rows.append(
            {"instruction": text, "output": "ref", "generator": "ref", "dataset": f"set{i % 2}"}
        )
    path.write_text(json.dumps(rows, indent=1))
    return rows


def demo_prompts() -> str:
    from orchestrator.demo import _packaged

    return str(_packaged("prompts.jsonl"))


def run_config(stack, tmp_path: Path, *, eval_file: Path, judge_url: str) -> Path:
    cfg = demo_config(
        store=stack.spec.store,
        base_model=stack.spec.base_model,
        generator_url=stack.generator_url,
        ranker_url=stack.ranker_url,
        redis_url=stack.redis_url,
        iterations=1,
    )
    cfg["shard_size"] = 8
    cfg["prompts"].update(per_iteration=48)
    cfg["evaluation"].update(
        prompts={"source": str(eval_file)}, judge=judge_url, best_of=[1, BEST_OF]
    )
    path = tmp_path / "eval-run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_alpaca_eval_source_best_of_and_separate_judge(stack, judge: str, tmp_path: Path) -> None:
    rows = alpaca_eval_file(tmp_path / "alpaca_eval.json")
    config = run_config(stack, tmp_path, eval_file=tmp_path / "alpaca_eval.json", judge_url=judge)
    before = {
        (url, route): items(url, route)
        for url in (stack.ranker_url, judge)
        for route in ("compare", "select", "rank")
    }
    run_dir = create_run(config, run_id="eval-e2e")
    settings = OrchestratorSettings(generator_admin_token=SecretStr(stack.admin_token))
    manifest = asyncio.run(execute_run(run_dir, console=Console(quiet=True), settings=settings))
    assert manifest.status == "completed"
    delta = {key: items(*key) - value for key, value in before.items()}

    # Outputs: exactly the file's instructions, in its order, with AlpacaEval's fields.
    for sub in ("policy0", "policy1", f"policy0/best_of_{BEST_OF}", f"policy1/best_of_{BEST_OF}"):
        out = json.loads((run_dir / "eval" / sub / "alpaca_eval_outputs.json").read_text())
        assert [o["instruction"] for o in out] == [r["instruction"] for r in rows]
        assert [o["dataset"] for o in out] == [r["dataset"] for r in rows]
        assert all(set(o) == {"instruction", "output", "generator", "dataset"} for o in out)
        assert {o["generator"] for o in out} == {f"eval-e2e.{sub.replace('/', '.')}"}

    # Training: no evaluation instruction in the slice or the datasets (compared normalised).
    banned = {normalise_instruction(r["instruction"]) for r in rows}
    trained = [p["prompt"] for p in read_prompts(run_dir / "prompts" / "iteration_1.jsonl")]
    for split in read_split_names(run_dir / "dataset"):
        trained += [r["prompt"] for r in load_rows(split_path(run_dir / "dataset", split))]
    assert len(trained) > 48 and not banned & {normalise_instruction(t) for t in trained}
    setup = manifest.stages["setup"].metrics
    assert setup["training_prompts_removed_as_eval"] == 16
    assert setup["eval_instructions_in_training"] == 0

    # Best-of-n: the pick is the scorer's argmax among the samples drawn (both policies).
    for k in (0, 1):
        root = run_dir / "eval" / f"policy{k}" / f"best_of_{BEST_OF}"
        samples = [
            json.loads(line)
            for f in sorted((root / "samples").glob("*.jsonl"))
            for line in f.read_text().splitlines()
        ]
        picks = [
            json.loads(line)
            for f in sorted((root / "picks").glob("*.jsonl"))
            for line in f.read_text().splitlines()
        ]
        assert len(samples) == len(picks) == 16
        for s, p in zip(samples, picks, strict=True):
            assert len(s["responses"]) == BEST_OF and s["prompt_id"] == p["prompt_id"]
            scores = [plain_prose(s["prompt"], r) for r in s["responses"]]
            assert plain_prose(s["prompt"], p["output"]) == max(scores)
            assert p["output"] == s["responses"][p["index"]]

    # Best-of-n's win rate against the base is at least best-of-1's, for the base and policy 1.
    base_eval = manifest.stages["policy0.evaluate"].metrics
    final = manifest.stages["iter1.evaluate"].metrics
    assert base_eval["best_of"][str(BEST_OF)]["vs_base"]["win_rate"] >= 0.5
    assert final["best_of"][str(BEST_OF)]["vs_base"]["win_rate"] >= final["vs_base"]["win_rate"], (
        final
    )
    assert final["vs_base"]["lc_glm"] == "length_controlled_minimal"

    # The separate judge made every comparison; the run's ranker ranked and picked, judged none.
    compared = 0
    for f in run_dir.glob("eval/**/annotations_*.json"):
        for a in json.loads(f.read_text()):
            x, y = a["output_1"], a["output_2"]
            compared += x != y and bool(x.strip()) and bool(y.strip())
    assert compared > 0
    assert delta[(judge, "compare")] == compared
    assert delta[(stack.ranker_url, "compare")] == 0
    assert delta[(judge, "select")] == delta[(judge, "rank")] == 0
    assert delta[(stack.ranker_url, "select")] > 0 and delta[(stack.ranker_url, "rank")] > 0
    # Named by kind and model (its /ready), not by its address, which changes at every start.
    assert final["judge"] == "scorer plain_prose" and final["judge_is_run_ranker"] is False

    report = (run_dir / "report" / "report.md").read_text()
    assert "scorer plain_prose, a separate ranker service" in report
    assert f"| 1 | {BEST_OF} |" in report
    for png in ("win_rate_vs_length.png", "length_distribution.png"):
        assert (run_dir / "report" / png).stat().st_size > 1000

    # Resumable in shards: a best-of-n shard lost mid-stage (samples and pick) is redone on resume,
    # and only it; the stage's other shards are not rewritten.
    m = load_manifest(run_dir)
    m.status, m.stages["iter1.evaluate"].state = "failed", "running"
    m.save(run_dir)
    root = run_dir / "eval" / "policy1" / f"best_of_{BEST_OF}"
    kept = {p: p.stat().st_mtime_ns for p in root.glob("*/shard-00000.jsonl")}
    lost = [root / "samples" / "shard-00001.jsonl", root / "picks" / "shard-00001.jsonl"]
    for path in lost:
        path.unlink()
    resumed = asyncio.run(execute_run(run_dir, console=Console(quiet=True), settings=settings))
    assert resumed.status == "completed" and resumed.stages["iter1.evaluate"].attempts == 2
    assert len(kept) == 2 and all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert all(len(path.read_text().splitlines()) == 8 for path in lost)

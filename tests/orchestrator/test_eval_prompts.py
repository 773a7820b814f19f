"""The evaluation's own instructions: AlpacaEval-format files, and never a training prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import DEFAULT_JUDGE_MODEL, ConfigError, EvalPromptsConfig, load_run_config
from orchestrator.local import StackSpec
from orchestrator.loop import create_run
from orchestrator.manifest import load_manifest
from orchestrator.prompts import (
    exclude_instructions,
    load_eval_prompts,
    normalise_instruction,
    read_prompts,
    write_prompts,
)
from orchestrator.runs import eval_overlap


def alpaca_rows() -> list[dict[str, str]]:
    """Rows as AlpacaEval's own eval set has them (its fields, two datasets)."""
    return [
        {
            "instruction": text,
            "output": "reference answer",
            "generator": "gpt4_1106_preview",
            "dataset": "helpful_base" if i % 2 else "koala",
        }
        for i, text in enumerate(
            [
                "Question number 3?",  # also a training prompt (conftest's prompts_file)
                "  question   NUMBER 7? ",  # the same as training prompt 7, spelled otherwise
                "What is the capital of Peru?",
                "Write a haiku about rain.",
                "What is the capital of Peru?",  # AlpacaEval has none, but a user file may
            ]
        )
    ]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_local_alpaca_eval_file_loads_in_order_with_dataset(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"eval{suffix}"
    rows = alpaca_rows()
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_eval_prompts(EvalPromptsConfig(source=str(path)))
    assert [g["prompt"] for g in got] == [r["instruction"] for r in rows[:4]]
    assert [g["index"] for g in got] == ["0", "1", "2", "3"]
    assert [g["dataset"] for g in got] == ["koala", "helpful_base", "koala", "helpful_base"]
    assert len(load_eval_prompts(EvalPromptsConfig(source=str(path), limit=2))) == 2
    with pytest.raises(ConfigError, match=r"evaluation\.prompts\.field.*'question'"):
        load_eval_prompts(EvalPromptsConfig(source=str(path), field="question"))
    if suffix == ".json":
        path.write_text(json.dumps({"instruction": "not a list"}))
        with pytest.raises(ConfigError, match=r"^evaluation\.prompts\.source: .* JSON list"):
            load_eval_prompts(EvalPromptsConfig(source=str(path)))


def test_defaults_are_alpaca_eval_2() -> None:
    cfg = EvalPromptsConfig()
    assert (cfg.source, cfg.name, cfg.split, cfg.field) == (
        "tatsu-lab/alpaca_eval",
        "alpaca_eval",
        "eval",
        "instruction",
    )
    recipe_path = Path(__file__).resolve().parents[2] / "configs/snorkel-mistral-pairrm.yaml"
    recipe = load_run_config(recipe_path)
    assert recipe.evaluation.prompts == cfg and recipe.evaluation.best_of == [1, 16]
    # Best-of-16 is picked by the run's ranker (PairRM) and judged by another service: the
    # `judge` (a reward model) that compose and the GPU overlays start, in every recipe config.
    repo = recipe_path.parents[1]
    recipes = [
        *(repo / "configs" / f"{name}-mistral-pairrm.yaml" for name in ("snorkel", "simpo", "sppo")),
        *(repo / "k8s" / "overlays" / o / "run-config.yaml" for o in ("gpu", "gpu-split")),
    ]
    for path in recipes:
        loaded = load_run_config(path)
        assert loaded.evaluation.judge == "http://judge:8002", path
        assert loaded.services.ranker_url == "http://ranker:8001", path
    # `--local` of a recipe config starts that judge itself (no `judge` host there).
    for path in recipes[:3]:
        spec = StackSpec.from_config(load_run_config(path))
        assert spec.judge_args is not None, path
        assert spec.judge_args[:4] == ["--backend", "reward-model", "--model", DEFAULT_JUDGE_MODEL]


def test_exclusion_is_by_normalised_text() -> None:
    assert normalise_instruction("  Hello\n  World ") == normalise_instruction("hello world")
    pool = [{"prompt_id": "a", "prompt": "Hello  World"}, {"prompt_id": "b", "prompt": "other"}]
    kept, removed = exclude_instructions(pool, [{"prompt_id": "x", "prompt": "hello world\n"}])
    assert kept == [pool[1]] and removed == 1


def test_create_run_uses_the_eval_file_and_trains_on_none_of_it(
    write_config, tmp_path: Path
) -> None:
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps(alpaca_rows()))
    run_dir = create_run(
        write_config(evaluation={"prompts": {"source": str(path)}}), run_id="with-eval"
    )
    evals = read_prompts(run_dir / "prompts" / "eval.jsonl")
    assert [e["prompt"] for e in evals] == [r["instruction"] for r in alpaca_rows()[:4]]
    banned = {normalise_instruction(e["prompt"]) for e in evals}
    training = [
        p["prompt"]
        for k in (1, 2)
        for p in read_prompts(run_dir / "prompts" / f"iteration_{k}.jsonl")
    ]
    assert len(training) == 20 and not banned & {normalise_instruction(t) for t in training}
    setup = load_manifest(run_dir).stages["setup"].metrics
    assert setup["training_prompts_removed_as_eval"] == 2
    assert setup["eval_instructions_in_training"] == 0 and setup["eval"] == 4


def test_the_separation_check_reads_the_slices_on_disk_and_can_fail(
    write_config, tmp_path: Path
) -> None:
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps(alpaca_rows()))
    run_dir = create_run(write_config(evaluation={"prompts": {"source": str(path)}}))
    assert eval_overlap(run_dir) == 0
    # A training slice that holds an evaluation instruction (spelled otherwise) is counted.
    slice_file = run_dir / "prompts" / "iteration_2.jsonl"
    rows = read_prompts(slice_file)
    rows[3]["prompt"] = "  WHAT is the capital   of Peru?"
    write_prompts(slice_file, rows)
    assert eval_overlap(run_dir) == 1


@pytest.mark.parametrize("too_long", ["skip", "truncate"])
def test_evaluation_instructions_go_through_admission(
    write_config, tmp_path: Path, too_long: str
) -> None:
    rows = alpaca_rows()[2:4]
    long_text = "Read this. " + "word " * 3000 + "Now: what is the last word?"
    rows.insert(1, {"instruction": long_text, "dataset": "koala"})
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps(rows))
    run_dir = create_run(
        write_config(
            prompts={"too_long": too_long},
            sampling={"max_tokens": 64},
            evaluation={"prompts": {"source": str(path)}, "max_tokens": 64},
        )
    )
    evals = read_prompts(run_dir / "prompts" / "eval.jsonl")
    setup = load_manifest(run_dir).stages["setup"].metrics
    skipped = read_prompts(run_dir / "prompts" / "skipped.jsonl")
    assert [s["slice"] for s in skipped] == ["eval"]
    if too_long == "skip":
        assert [e["prompt"] for e in evals] == [rows[0]["instruction"], rows[2]["instruction"]]
        assert setup["eval_admission"]["too_long_skipped"] == 1 and setup["eval"] == 2
    else:  # cut to fit, keeping the end (the question), and its source index
        assert evals[1]["prompt"].endswith("Now: what is the last word?")
        assert len(evals[1]["prompt"]) < len(long_text) and evals[1]["index"] == "1"
        assert setup["eval_admission"]["too_long_truncated"] == 1 and setup["eval"] == 3


@pytest.mark.parametrize(
    ("evaluation", "expected"),
    [
        ({"best_of": [4]}, "best_of must include 1"),
        ({"best_of": [1, 0]}, ">= 1"),
        ({"judge": "ranker:8001"}, r"evaluation\.judge"),
        ({"prompts": {"source": "missing.json"}}, r"evaluation\.prompts\.source"),
    ],
)
def test_bad_evaluation_fields_are_named(write_config, evaluation: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        create_run(write_config(evaluation=evaluation))

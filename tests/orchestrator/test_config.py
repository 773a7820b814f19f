"""Run configs are validated on load; every bad field is named; nothing is created before that."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, RunConfig, load_run_config
from orchestrator.loop import create_run


def test_defaults_are_the_recipe() -> None:
    cfg = RunConfig(base_model="b", model_store="s")
    assert (cfg.iterations, cfg.samples_per_prompt, cfg.prompts.per_iteration) == (3, 5, 20_000)
    assert cfg.prompts.source == "HuggingFaceH4/ultrafeedback_binarized"
    assert cfg.ranker.mode == "full" and cfg.pairs.rule == "best_vs_worst"
    assert (cfg.dpo.beta, cfg.dpo.learning_rate, cfg.dpo.max_length) == (0.01, 5e-7, 1024)


def test_paths_are_resolved_against_the_config_and_store(write_config, store: Path) -> None:
    cfg = load_run_config(write_config())
    assert cfg.base_model == str((store / "models" / "base").resolve())


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"sampling": {"temperature": 9}}, "sampling.temperature"),
        ({"samples_per_prompt": 1}, "samples_per_prompt"),
        ({"pairs": {"rule": "random"}}, "pairs.rule"),
        ({"dpo": {"beta": -1}}, "dpo.beta"),
        ({"itertions": 3}, "itertions: unknown field"),
        ({"services": {"ranker_url": "localhost:8001"}}, "services.ranker_url"),
        ({"pairs": {"rule": "length_penalised"}}, "length_penalty > 0"),
    ],
)
def test_bad_fields_are_named(write_config, override: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_run_config(write_config(**override))


def test_missing_inputs_are_rejected_before_any_work(
    write_config, store: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="base_model"):
        create_run(write_config(base_model="models/nope"))
    with pytest.raises(ConfigError, match=r"prompts\.source"):
        create_run(write_config(prompts={"source": str(tmp_path / "missing.jsonl")}))
    with pytest.raises(ConfigError, match="needs 1006"):
        create_run(write_config(prompts={"per_iteration": 500}))
    assert not (store / "runs").exists()


def test_cli_reports_bad_config_without_traceback(
    write_config, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", str(write_config(sampling={"temperature": "hot"}))])
    out = capsys.readouterr()
    assert code == 2
    assert "sampling.temperature" in out.out + out.err
    assert "Traceback" not in out.out + out.err


def test_create_run_freezes_prompts_and_refuses_to_overwrite(write_config, store: Path) -> None:
    run_dir = create_run(write_config(), run_id="r1")
    assert run_dir == store / "runs" / "r1"
    assert sorted(p.name for p in (run_dir / "prompts").iterdir()) == [
        "eval.jsonl",
        "iteration_1.jsonl",
        "iteration_2.jsonl",
        "skipped.jsonl",  # prompt admission's list (empty here: every prompt fits)
    ]
    assert (run_dir / "prompts" / "skipped.jsonl").read_text() == ""
    with pytest.raises(ConfigError, match="already exists"):
        create_run(write_config(), run_id="r1")


def test_shipped_configs_load(tmp_path: Path) -> None:
    from orchestrator.demo import demo_config

    root = Path(__file__).resolve().parents[2]
    recipe = load_run_config(root / "configs" / "snorkel-mistral-pairrm.yaml")
    assert recipe.prompts.per_iteration == 20_000 and recipe.samples_per_prompt == 5
    assert recipe.base_model == "/models/models/Mistral-7B-Instruct-v0.2"
    demo = RunConfig.model_validate(
        demo_config(
            store=tmp_path,
            base_model=tmp_path / "m",
            generator_url="http://g:1",
            ranker_url="http://r:2",
            redis_url="redis://x:6379/0",
            iterations=3,
        )
    )
    assert demo.iterations == 3 and demo.prompts.source.endswith("prompts.jsonl")

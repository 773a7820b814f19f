"""Help texts a new user reads: flags read as flags, `api` names its environment, `plan` prints a
tiny model's size as it is."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from orchestrator.cli import app


def _invoke(*args: str) -> str:
    done = CliRunner().invoke(app, list(args), env={"COLUMNS": "160"})
    assert done.exit_code == 0, done.output
    return done.output


def test_flags_read_as_flags() -> None:
    out = _invoke("run", "--help")
    assert "--local " in out and "<bool>" not in out
    assert "--set FIELD=VALUE" in out
    assert "<bool>" not in _invoke("resume", "--help")


def test_api_help_names_the_environment_it_reads() -> None:
    out = _invoke("api", "--help")
    for name in (
        "PAIRLOOP_ORCHESTRATOR_API_TOKEN",
        "PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN",
        "PAIRLOOP_ORCHESTRATOR_RUNS_ROOT",
        "PAIRLOOP_ORCHESTRATOR_PORT [8080]",
        "PAIRLOOP_REDIS_URL",
    ):
        assert name in out, name
    assert "default from settings" not in out


def test_plan_prints_a_tiny_model_size_and_one_gpu(tiny_models: dict[str, Path]) -> None:
    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    out = _invoke(
        "plan",
        str(config),
        "--gpus",
        "1",
        "--model-config",
        str(tiny_models["llama"] / "config.json"),
    )
    assert "0.00B" not in out and "K parameters" in out
    (trainer,) = [line for line in out.splitlines() if line.startswith("trainer:")]
    assert trainer.endswith("on 1 GPU")

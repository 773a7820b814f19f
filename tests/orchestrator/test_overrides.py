"""`pairloop run CONFIG --set dpo.beta=0.05 --set iterations=2`: validated like the file, named in
the error when wrong, recorded in the run's frozen config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, load_run_config
from orchestrator.manifest import load_manifest
from pairloop_local.processes import free_port

from .test_run_state import run_cli


def test_overrides_set_nested_fields_with_yaml_values(write_config: Callable[..., Path]) -> None:
    cfg = load_run_config(
        write_config(),
        ["dpo.beta=0.05", "iterations=3", "dpo.report_to=none", "evaluation.best_of=[1, 4]"],
    )
    assert cfg.dpo.beta == 0.05 and cfg.iterations == 3
    assert cfg.dpo.report_to == [] and cfg.evaluation.best_of == [1, 4]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("dpo.beta=-1", "dpo.beta"),
        ("dpo.betta=0.1", "dpo.betta"),
        ("iterations=many", "iterations"),
        ("iterations.k=2", "iterations is not a section"),
        ("beta", "expected FIELD=VALUE"),
    ],
)
def test_a_bad_override_names_the_field(
    write_config: Callable[..., Path], override: str, named: str
) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_run_config(write_config(), [override])


def test_cli_override_is_recorded_in_the_frozen_config(
    write_config: Callable[..., Path], store: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_config(services={"generator_urls": [dead], "ranker_url": dead, "retries": 0})
    done = run_cli(
        "run", str(config), "--run-id", "over", "--set", "dpo.beta=0.05", "--set", "iterations=1"
    )
    assert done.returncode == 1, done.stdout + done.stderr  # the run exists; its services do not
    run_dir = store / "runs" / "over"
    frozen = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert frozen["dpo"]["beta"] == 0.05 and frozen["iterations"] == 1
    m = load_manifest(run_dir)
    assert m.iterations == 1
    assert m.stages["setup"].metrics["config_overrides"] == ["dpo.beta=0.05", "iterations=1"]

    bad = run_cli("run", str(config), "--set", "dpo.beta=zero")
    assert bad.returncode == 2
    assert "dpo.beta" in bad.stderr and "Traceback" not in bad.stderr

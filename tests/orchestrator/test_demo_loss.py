"""`pairloop demo --loss NAME`: the demo's config under that loss; an unknown name is refused
before anything is built, in one line naming the accepted losses."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import RunConfig
from orchestrator.demo import demo_config
from pairloop.losses import ACCEPTED_LOSSES


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo", "sppo"])
def test_the_demo_config_trains_with_the_loss(tmp_path: Path, loss: str) -> None:
    raw = demo_config(store=tmp_path, base_model=tmp_path / "m", iterations=1, loss=loss)
    cfg = RunConfig.model_validate(raw)
    assert cfg.dpo.loss_type == [loss]
    if loss == "simpo":  # SimPO's own scale: beta on the average log-prob, and its margin
        assert (cfg.dpo.beta, cfg.dpo.simpo_gamma) == (2.5, 0.25)
    else:
        assert cfg.dpo.beta == 0.1
    if loss == "sppo":  # it trains on the full ranking's win probabilities
        assert cfg.ranker.mode == "full"


def test_an_unknown_loss_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "w"
    assert main(["demo", "--workdir", str(workdir), "--loss", "dpo"]) == 2
    err = capsys.readouterr().err
    assert "--loss 'dpo' is unknown" in err and all(n in err for n in ACCEPTED_LOSSES)
    assert "Traceback" not in err and not workdir.exists()

"""`pairloop compare`: two finished run directories, written through the project's own manifest
code, compared in one table and one plot; bad input is one line on stderr."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.compare import load_run_rows, win_rate_length_figure
from orchestrator.manifest import Manifest
from pairloop.jobs import DPOHyperparameters


def finished_run(root: Path, name: str, hp: DPOHyperparameters, figures: list[tuple]) -> Path:
    """A run directory whose manifest records, per iteration, (win, LC win, length, loss)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    m = Manifest(run_id=name, config_fingerprint="f", iterations=len(figures), status="completed")
    m.stage("policy0.evaluate").metrics = {"mean_length": 100.0}
    for k, (win, lc, length, loss) in enumerate(figures, start=1):
        m.stage(f"iter{k}.train").metrics = {"dpo/train_loss": loss, "loss": hp.loss_settings()}
        m.stage(f"iter{k}.evaluate").metrics = {
            "vs_base": {"win_rate": win, "lc_win_rate": lc},
            "mean_length": length,
        }
    for record in m.stages.values():
        record.state = "done"
    m.save(run_dir)
    return run_dir


@pytest.fixture()
def two_runs(tmp_path: Path) -> list[Path]:
    dpo = finished_run(
        tmp_path,
        "dpo",
        DPOHyperparameters(beta=0.1),
        [(0.62, 0.55, 150.0, 0.61), (0.71, 0.58, 210.0, 0.52)],
    )
    simpo = finished_run(
        tmp_path,
        "simpo",
        DPOHyperparameters(loss_type="simpo", beta=2.5, simpo_gamma=0.25),
        [(0.66, 0.64, 120.0, 1.31)],
    )
    return [dpo, simpo]


def test_compare_prints_one_table_and_writes_the_plot(
    two_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, two_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # The terminal table wraps its cells to the terminal's width; compare.md holds them whole.
    assert "pairloop runs compared" in printed and "0.710" in printed and "simpo" in printed

    table = (out / "compare.md").read_text()
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| dpo") or line.startswith("| simpo")
    ]
    assert len(rows) == 5  # base + 2 iterations, base + 1 iteration
    assert "| dpo | sigmoid (beta 0.1) | 2 | 0.710 | 0.580 | 210.0 | x2.10 | 0.5200 |" in rows
    assert (
        "| simpo | simpo (beta 2.5, simpo_gamma 0.25) | 1 | 0.660 | 0.640 | 120.0 | x1.20 | 1.3100 |"
        in rows
    )
    assert (out / "win_rate_vs_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_has_one_line_per_run_title_and_axes(two_runs: list[Path]) -> None:
    import matplotlib.pyplot as plt

    fig = win_rate_length_figure([load_run_rows(d) for d in two_runs])
    ax = fig.axes[0]
    assert ax.get_title() and "length" in ax.get_xlabel() and "win rate" in ax.get_ylabel()
    lines = {line.get_label(): line for line in ax.get_lines()}
    dpo = lines["dpo: sigmoid (beta 0.1)"]
    assert list(dpo.get_xdata()) == [150.0, 210.0] and list(dpo.get_ydata()) == [0.62, 0.71]
    assert "simpo: simpo (beta 2.5, simpo_gamma 0.25)" in lines
    plt.close(fig)


def test_a_directory_that_is_not_a_run_is_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a run directory" in err and "Traceback" not in err

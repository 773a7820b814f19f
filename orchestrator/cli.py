"""The `pairloop` command line.

    pairloop run configs/snorkel-mistral-pairrm.yaml   # create a run from a YAML config and execute it
    pairloop run configs/demo.yaml --local             # ... on a stack started on this machine for it
    pairloop resume RUN_DIR [--local]                  # continue after a crash or cancel; redoes nothing finished
    pairloop status [RUN_DIR]                          # one run's stages, or every run under ./runs
    pairloop report RUN_DIR                            # (re)write RUN_DIR/report/report.md and plots
    pairloop compare RUN_DIR RUN_DIR... [--out DIR]    # runs side by side: one table, win rate vs length
    pairloop cancel RUN_DIR                            # ask a running run to stop at the next safe point
    pairloop demo [--new] [--loss simpo]               # the whole loop on this machine: tiny models, local services
    pairloop api                                       # the status API + best-of-n chat completions
    pairloop tiny-models OUT_DIR                       # tiny Llama/Mistral chat models and a tiny PairRM, offline
    pairloop plan CONFIG --gpus 8 --gpu-memory 80      # memory per GPU of each stage; non-zero if it cannot fit

Each command is a thin shell over a library function; heavy imports happen inside the command.
Every error prints as one message on stderr saying what to do next (exit status 2: bad input,
1: a failure, 130: interrupted), never a traceback; `pairloop --debug ...` shows the traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from orchestrator.config import RunConfig
    from orchestrator.phases import PhasePlan
    from orchestrator.plan import Plan

app = typer.Typer(
    name="pairloop",
    help="Iterative DPO with an external ranker: generator, ranker, trainer and the loop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: flags read as flags (`--local`), where rich help shows `--local <bool>`.
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an error, not only its message.")
    ] = False,
) -> None:
    """Iterative DPO with an external ranker."""
    _state["debug"] = debug


def _fail(message: str, code: int = 1) -> typer.Exit:
    # soft_wrap: one message stays one line, whatever the terminal width (or none, in CI logs).
    from pairloop.redact import redact_text

    # A Redis URL in a message may carry its password: never on a terminal or in a CI log.
    err_console.print(f"[red]error:[/red] {redact_text(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _resume_command(run_dir: Path, *, local: bool) -> str:
    from orchestrator.run_state import resume_command

    # A run started on a local stack is resumed with --local, whatever this command was given.
    return resume_command(run_dir, local=True if local else None)


@contextlib.contextmanager
def _errors_as_messages(next_command: str | None) -> Iterator[None]:
    """Turn whatever stops a command into a message with the next step (`--debug`: traceback).

    `next_command` continues the work (`pairloop resume RUN_DIR`); None before a run exists.
    """
    from orchestrator.config import ConfigError
    from orchestrator.context import RunCancelledError
    from orchestrator.runs import RunLockedError
    from pairloop.errors import PairloopError
    from pairloop_local.processes import ProcessFailedError

    resume = f"`{next_command}` continues it" if next_command else ""
    try:
        yield
    except typer.Exit:
        raise
    except (ConfigError, RunLockedError) as exc:
        if _state["debug"]:
            raise
        raise _fail(str(exc), 2) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        if _state["debug"]:
            raise
        raise _fail(f"interrupted; {resume or 'nothing was started'}", 130) from None
    except (RunCancelledError, InterruptedError) as exc:
        if _state["debug"]:
            raise
        raise _fail(f"{exc}; {resume}", 1) from None
    except ProcessFailedError as exc:
        if _state["debug"]:
            raise
        # The service's log tail is the cause: keep its lines.
        raise _fail(f"the local stack failed: {exc}\nfix the cause, then {resume}", 1) from None
    except PairloopError as exc:
        if _state["debug"]:
            raise
        step = f"fix the cause, then {resume}" if resume else "fix the cause and retry"
        raise _fail(f"{_one_line(exc.message)}; the run stopped; {step}", 1) from None
    except Exception as exc:
        if _state["debug"]:
            raise
        step = f"; {resume}" if resume else ""
        raise _fail(
            f"{type(exc).__name__}: {_one_line(str(exc))}{step} (`pairloop --debug ...` shows "
            "the traceback)",
            1,
        ) from None


def _execute(run_dir: Path, *, local: bool = False) -> None:
    from orchestrator.local import run_local, run_until_signal
    from orchestrator.loop import execute_run
    from orchestrator.summary import print_summary

    console.print(f"run directory: {run_dir}")
    with _errors_as_messages(_resume_command(run_dir, local=local)):
        if local:
            manifest = run_local(run_dir, console=console)
        else:
            manifest = run_until_signal(execute_run(run_dir, console=console))
    print_summary(run_dir, manifest, console=console)


def _print_plan(plan: Plan) -> None:
    from orchestrator.plan import GIB

    table = Table(title=f"memory per GPU: {plan.gpus} x {plan.gpu_memory_gib:g} GiB")
    for col in ("stage", "part", "GiB"):
        table.add_column(col, justify="right" if col == "GiB" else "left")
    for stage in plan.stages:
        for i, (part, size) in enumerate(stage.parts.items()):
            table.add_row(stage.stage if i == 0 else "", part, f"{size / GIB:.1f}")
        verdict = "fits" if stage.fits else "[red]does not fit[/red]"
        table.add_row(
            "", f"total (limit {stage.budget / GIB:.1f}): {verdict}", f"{stage.total / GIB:.1f}"
        )
    out = console if console.is_terminal else Console(width=max(console.width, 120))
    out.print(table)
    console.print(f"model: {_count(plan.parameters)} parameters ({plan.shape_source})")
    accumulation = plan.gradient_accumulation_steps
    gpus = f"{plan.gpus} GPU{'s' if plan.gpus != 1 else ''}"
    if plan.machines > 1:
        gpus = f"{plan.machines} machines x {gpus}"
    console.print(
        f"trainer: strategy {plan.strategy}, global batch {plan.global_batch_size}, gradient "
        f"accumulation {accumulation if accumulation is not None else '-'} on {gpus}"
    )


def _count(n: float) -> str:
    """7.24B, 85.1M, 203.6K: a parameter count at the scale it has (a tiny model is not 0.00B)."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g}{unit}" if n < 100 * size else f"{n / size:.0f}{unit}"
    return f"{n:.0f}"


def _make_plan(
    config: Path,
    gpus: int,
    gpu_memory: float,
    model_config: Path | None,
    strategy: str | None = None,
    overrides: Sequence[str] = (),
    *,
    host_memory: float | None = None,
) -> tuple[RunConfig, Plan]:
    """The run config and its memory plan; exit 2 on a bad config or an unknown model shape."""
    from orchestrator.config import ConfigError, load_run_config
    from orchestrator.plan import PlanError, load_shape, plan_run

    try:
        cfg = load_run_config(config, overrides)
        shape, source = load_shape(cfg.base_model, model_config)
    except (ConfigError, PlanError) as exc:
        raise _fail(str(exc), 2) from None
    plan = plan_run(
        cfg,
        gpus=gpus,
        gpu_memory_gib=gpu_memory,
        shape=shape,
        shape_source=source,
        strategy=strategy,  # type: ignore[arg-type]  # typer checked it against the choices
        host_memory_gib=host_memory,
    )
    return cfg, plan


def _check_plan(
    config: Path,
    gpus: int,
    gpu_memory: float,
    model_config: Path | None,
    strategy: str | None = None,
    overrides: Sequence[str] = (),
    *,
    host_memory: float | None = None,
) -> None:
    """Fail (exit 2) before any work when a stage cannot fit the GPUs (or the host memory)."""
    _, plan = _make_plan(
        config, gpus, gpu_memory, model_config, strategy, overrides, host_memory=host_memory
    )
    _print_plan(plan)
    if not plan.fits:
        raise _fail("this run cannot fit these GPUs:\n  " + "\n  ".join(plan.problems), 2)


def _print_phases(phases: PhasePlan) -> None:
    from orchestrator.plan import GIB

    table = Table(
        title=f"phases of one iteration ({phases.placement} placement, "
        f"{phases.iterations} iterations)"
    )
    for col in ("phase", "GPUs", "GiB per GPU", "time", "work"):
        table.add_column(col, justify="right" if col in ("GiB per GPU", "time") else "left")
    for p in phases.phases:
        gpus = f"{p.gpus[0]}-{p.gpus[-1]}" if len(p.gpus) > 1 else str(p.gpus[0])
        verdict = "" if p.fits else " [red]does not fit[/red]"
        table.add_row(
            p.phase,
            f"{gpus} ({len(p.gpus)})",
            f"{p.bytes_per_gpu / GIB:.1f} of {p.budget / GIB:.1f}{verdict}",
            f"{p.seconds / 3600:.2f} h",
            p.work,
        )
    out = console if console.is_terminal else Console(width=max(console.width, 160))
    out.print(table)
    if phases.switch_seconds:
        console.print(
            f"release + wake of the generator: {phases.switch_seconds:.0f} s per iteration"
        )
    for phase, idle in phases.idle_gpus.items():
        console.print(f"idle during {phase}: GPUs {', '.join(map(str, idle))}")
    ranker = phases.ranker_json()
    console.print(
        f"ranker: one PairRM replica on each of GPUs {', '.join(map(str, ranker['gpus']))} "
        f"({ranker['replicas']} replicas, {ranker['devices_setting']}), "
        f"{ranker['requests_in_flight']} ranking requests in flight"
    )
    judge = any(part.startswith("judge") for p in phases.phases for part in p.parts)
    console.print(
        f"generator: gpu_memory_utilization at most {phases.generator_memory_utilization:.2f} "
        f"(the ranker{' and the judge' if judge else ''} share its GPUs)"
    )
    console.print(
        f"estimated wall time: {phases.seconds_per_iteration / 3600:.2f} h per iteration, "
        f"{phases.total_seconds / 3600:.2f} h for {phases.iterations} iterations "
        "(throughput assumptions: see pairloop plan --help)"
    )


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="YAML run config (see configs/).")],
    gpus: Annotated[
        int, typer.Option(min=1, help="GPUs of the node (the trainer shards over them).")
    ] = 8,
    gpu_memory: Annotated[float, typer.Option(min=1, help="Memory of one GPU, GiB.")] = 80,
    model_config: Annotated[
        Path | None, typer.Option(help="The base model's config.json (default: its own).")
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(help="ddp or fsdp (default: dpo.strategy, else fsdp)."),
    ] = None,
    host_memory: Annotated[
        float | None,
        typer.Option(min=1, help="Host memory of the training machine, GiB: refuse beyond it."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON (phases, memory, wall time).")
    ] = False,
    placement: Annotated[
        str | None,
        typer.Option(help="time_shared or dedicated (default: the config's placement)."),
    ] = None,
    generation_gpus: Annotated[
        int, typer.Option(min=1, help="dedicated placement: GPUs of generation and ranking.")
    ] = 1,
    generation_tokens_per_s: Annotated[
        float,
        typer.Option(min=1e-3, help="Generated tokens/s per GPU for a 7B model (vLLM, bf16)."),
    ] = 8000.0,
    ranking_passes_per_s: Annotated[
        float, typer.Option(min=1e-3, help="PairRM forward passes/s per GPU.")
    ] = 185.0,
    training_tokens_per_s: Annotated[
        float,
        typer.Option(min=1e-3, help="DPO tokens/s per GPU for a 7B model (FSDP, bf16)."),
    ] = 2500.0,
    response_tokens: Annotated[
        int, typer.Option(min=1, help="Mean tokens of a generated response.")
    ] = 400,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Mean tokens of a prompt.")] = 200,
    wake_s: Annotated[
        float, typer.Option(min=0, help="Seconds of a generator wake (reload of the weights).")
    ] = 60.0,
    release_s: Annotated[
        float, typer.Option(min=0, help="Seconds of a generator release (vLLM sleep).")
    ] = 5.0,
) -> None:
    """Each phase's GPUs, memory per GPU and wall time; exit 2 naming the knob to turn if a
    stage cannot fit. Throughputs are per GPU for the recipe's 7B model on an H100-class GPU,
    scaled by parameter count for other models (orchestrator/phases.py says where they come from)."""
    from orchestrator.phases import Throughput, plan_phases

    if strategy not in (None, "ddp", "fsdp"):
        raise typer.BadParameter("choose ddp or fsdp", param_hint="--strategy")
    if placement not in (None, "time_shared", "dedicated"):
        raise typer.BadParameter("choose time_shared or dedicated", param_hint="--placement")
    cfg, memory = _make_plan(
        config, gpus, gpu_memory, model_config, strategy, host_memory=host_memory
    )
    phases = plan_phases(
        cfg,
        memory,
        placement=placement,  # type: ignore[arg-type]  # checked against the choices above
        generation_gpus=generation_gpus,
        throughput=Throughput(
            generation_tokens_per_s=generation_tokens_per_s,
            ranking_passes_per_s=ranking_passes_per_s,
            training_tokens_per_s=training_tokens_per_s,
            response_tokens=response_tokens,
            prompt_tokens=prompt_tokens,
            release_s=release_s,
            wake_s=wake_s,
        ),
    )
    problems = memory.problems + phases.problems
    if json_out:
        from dataclasses import asdict

        payload = {
            "gpus": memory.gpus,
            "gpu_memory_gib": memory.gpu_memory_gib,
            "parameters": memory.parameters,
            "strategy": memory.strategy,
            "gradient_accumulation_steps": memory.gradient_accumulation_steps,
            "global_batch_size": memory.global_batch_size,
            "stages": [{**asdict(s), "total": s.total, "fits": s.fits} for s in memory.stages],
            "training": memory.training_memory(),
            **phases.as_json(),
            "fits": not problems,
            "problems": problems,
        }
        typer.echo(json.dumps(payload, indent=2))
        if problems:
            raise _fail("this run cannot fit:\n  " + "\n  ".join(problems), 2)
        return
    _print_plan(memory)
    _print_phases(phases)
    if problems:
        raise _fail("this run cannot fit these GPUs:\n  " + "\n  ".join(problems), 2)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML run config (see configs/).")],
    run_id: Annotated[
        str | None, typer.Option(help="Name of the run (default: config name + time).")
    ] = None,
    gpus: Annotated[
        int | None,
        typer.Option(min=1, help="Trainer GPUs: check the plan (`pairloop plan`) before any work."),
    ] = None,
    gpu_memory: Annotated[
        float, typer.Option(min=1, help="Memory of one GPU, GiB (with --gpus).")
    ] = 80,
    host_memory: Annotated[
        float | None,
        typer.Option(min=1, help="Host memory of the training machine, GiB (with --gpus)."),
    ] = None,
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="Start the services the config needs on this machine (its `local:` section), "
            "run, and stop them.",
        ),
    ] = False,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="FIELD=VALUE",
            help="Override a config field (repeatable), e.g. --set dpo.beta=0.05 --set "
            "iterations=2; validated as the file is, recorded in the run's config.yaml.",
        ),
    ] = None,
) -> None:
    """Create a run from CONFIG and execute it."""
    from orchestrator.runs import create_run

    if gpus is not None:
        _check_plan(
            config, gpus, gpu_memory, None, overrides=overrides or (), host_memory=host_memory
        )
    with _errors_as_messages(None):
        run_dir = create_run(config, run_id=run_id, overrides=overrides or ())
    _execute(run_dir, local=local)


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (holds manifest.json).")],
    local: Annotated[
        bool,
        typer.Option("--local", help="Restart the run's local stack on this machine and continue."),
    ] = False,
) -> None:
    """Continue a run: finished stages and shards are not redone."""
    from orchestrator.manifest import load_manifest
    from orchestrator.run_state import executing

    if not (run_dir / "manifest.json").is_file():
        raise _fail(f"{run_dir} is not a run directory (no manifest.json)", 2)
    m = load_manifest(run_dir)
    if m.status == "completed":
        # Nothing to do, and nothing to touch: no service is reached, the manifest stays as it is.
        console.print(
            f"run {m.run_id} is complete ({len(m.stages)} stages done); nothing to resume. "
            f"Report: {run_dir / 'report' / 'report.md'}",
            highlight=False,
        )
        return
    if executing(run_dir):
        raise _fail(
            f"run {run_dir} is being executed by another process; `pairloop status {run_dir}` "
            f"shows its progress, `pairloop cancel {run_dir}` stops it",
            2,
        )
    (run_dir / "CANCEL").unlink(missing_ok=True)
    if not local and (run_dir / "local" / "stack.json").is_file():
        console.print(
            "note: this run was started on a local stack; `--local` starts that stack again "
            "(without it, the services in its config must be running)"
        )
    _execute(run_dir.resolve(), local=local)


@app.command(hidden=True)
def execute(
    run_dir: Annotated[Path, typer.Argument(help="A run directory created by the API.")],
) -> None:
    """Execute a created run as it is (the status API starts runs with this; a pending cancel stays)."""
    if not (run_dir / "manifest.json").is_file():
        raise _fail(f"{run_dir} is not a run directory (no manifest.json)", 2)
    _execute(run_dir.resolve())


@app.command()
def status(
    run_dir: Annotated[
        Path | None, typer.Argument(help="A run directory; omit to list runs.")
    ] = None,
    runs_root: Annotated[
        Path, typer.Option(help="Where to list runs (a run config's MODEL_STORE/runs).")
    ] = Path("runs"),
) -> None:
    """Show one run's stages and progress, or list the runs under --runs-root."""
    from orchestrator.manifest import load_manifest
    from orchestrator.run_state import (
        executing,
        frozen_shard_size,
        latest_win_rates,
        running_stage,
        stage_progress,
        status_word,
        when,
    )

    if run_dir is None:
        if not runs_root.is_dir():
            raise _fail(
                f"{runs_root} is not a directory; runs live under their config's "
                "MODEL_STORE/runs (`pairloop status --runs-root MODEL_STORE/runs`)",
                2,
            )
        table = Table(title=f"runs under {runs_root}")
        for col in ("run", "status", "stages done", "running", "latest win rate", "updated"):
            table.add_column(col)
        for path in sorted(runs_root.glob("*/manifest.json")):
            m = load_manifest(path.parent)
            done = sum(1 for s in m.stages.values() if s.state == "done")
            table.add_row(
                m.run_id,
                status_word(path.parent, m.status),
                f"{done}/{len(m.stages)}",
                running_stage(path.parent, m, frozen_shard_size(path.parent)),
                latest_win_rates(m),
                when(m.updated_at),
            )
        out = console if console.is_terminal else Console(width=max(console.width, 160))
        out.print(table)
        return
    try:
        m = load_manifest(run_dir)
    except FileNotFoundError:
        raise _fail(f"{run_dir} is not a run directory (no manifest.json)", 2) from None
    word = status_word(run_dir, m.status)
    table = Table(title=f"run {m.run_id}: {word}" + (f" ({m.error})" if m.error else ""))
    for col in ("stage", "state", "progress", "started", "seconds", "attempts", "error"):
        table.add_column(col)
    shard_size = frozen_shard_size(run_dir)
    for name, st in m.stages.items():
        progress = (
            stage_progress(run_dir, name, m, shard_size=shard_size) if st.state != "done" else ""
        )
        table.add_row(
            name,
            st.state,
            progress,
            when(st.started_at),
            f"{st.seconds:.1f}",
            str(st.attempts),
            st.error or "",
        )
    out = console if console.is_terminal else Console(width=max(console.width, 160))
    out.print(table)
    console.print(
        f"updated {when(m.updated_at)}; "
        + ("a process is executing it" if executing(run_dir) else "no process is executing it"),
        highlight=False,
    )
    console.print(f"latest win rates: {latest_win_rates(m)}", highlight=False)
    from orchestrator.admission import admission_summary

    setup = m.stages.get("setup")
    if setup and setup.metrics.get("prompts"):
        console.print(f"prompts: {admission_summary(setup.metrics['prompts'])}", highlight=False)
    failed = sum(int(st.metrics.get("failed_prompts", 0)) for st in m.stages.values())
    if failed:
        console.print(f"prompts the generator could not answer: {failed}", highlight=False)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """(Re)write the run's report from its manifest."""
    from orchestrator.manifest import load_manifest
    from orchestrator.report import write_report

    try:
        m = load_manifest(run_dir)
    except FileNotFoundError:
        raise _fail(f"{run_dir} is not a run directory (no manifest.json)", 2) from None
    console.print(f"report: {write_report(run_dir, m)}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories to compare.")],
    out: Annotated[
        Path, typer.Option(help="Where compare.md and win_rate_vs_length.png go.")
    ] = Path("compare"),
) -> None:
    """Runs side by side: per iteration win rate, LC win rate, mean length, and each run's loss."""
    from orchestrator.compare import HEADER, CompareError, compare_runs, table_rows

    try:
        runs, table_path, plot_path = compare_runs(run_dirs, out)
    except CompareError as exc:
        raise _fail(str(exc), 2) from None
    table = Table(*HEADER, title="pairloop runs compared")
    for cells in table_rows(runs):
        table.add_row(*cells)
    console.print(table)
    console.print(f"table: {table_path}\nplot: {plot_path}")


@app.command()
def push(run_dir: Annotated[Path, typer.Argument(help="A completed run directory.")]) -> None:
    """(Re)write the final policy's model card and upload it and the datasets (push_to_hub)."""
    from orchestrator.publish import PushError, push_to_hub, write_model_card
    from orchestrator.runs import load_run

    if not (run_dir / "manifest.json").is_file():
        raise _fail(f"{run_dir} is not a run directory (no manifest.json)", 2)
    cfg, m = load_run(run_dir.resolve())
    card = write_model_card(run_dir.resolve(), cfg, m)
    if card is None:
        raise _fail(f"run {m.run_id} has no final policy yet (status {m.status})", 1)
    console.print(f"model card: {card}")
    if cfg.push_to_hub is None:
        raise _fail("the run's config has no push_to_hub section: nothing to upload", 2)
    try:
        urls = push_to_hub(run_dir.resolve(), cfg)
    except PushError as exc:
        raise _fail(exc.message, 1) from None
    for kind, url in urls.items():
        console.print(f"pushed {kind}: {url}")


@app.command()
def cancel(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Ask the process executing RUN_DIR to stop at its next safe point."""
    from orchestrator.manifest import load_manifest
    from orchestrator.run_state import executing, resume_command

    if not (run_dir / "manifest.json").is_file():
        raise _fail(f"{run_dir} is not a run directory (no manifest.json)", 2)
    m = load_manifest(run_dir)
    # A run created by the status API and not yet started takes the cancel when it starts.
    if not executing(run_dir) and m.status != "created":
        after = (
            "" if m.status == "completed" else f"; `{resume_command(run_dir)}` would continue it"
        )
        raise _fail(
            f"no process is executing {run_dir} (status: {m.status}): nothing to cancel, "
            f"nothing written{after}",
            1,
        )
    (run_dir / "CANCEL").write_text("cancel requested\n")
    console.print(f"cancel requested for {run_dir}: it stops at its next safe point")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where models, runs and logs go.")] = Path("demo"),
    iterations: Annotated[int, typer.Option(min=1, help="DPO iterations.")] = 3,
    new: Annotated[
        bool, typer.Option("--new", help="Start a fresh demo run even if one is unfinished.")
    ] = False,
    prompts: Annotated[
        Path | None,
        typer.Option(help="Your own prompts: JSONL (or .json/.parquet) rows with a prompt field."),
    ] = None,
    prompt_field: Annotated[str, typer.Option(help="The field of --prompts holding the text.")] = (
        "prompt"
    ),
    loss: Annotated[
        str,
        typer.Option(help="The training loss: sigmoid (DPO), ipo, simpo, sppo or any TRL name."),
    ] = "sigmoid",
) -> None:
    """The embedded default: the whole loop on this machine with tiny models and local services.

    Run again with the same --workdir, it continues an unfinished demo run (`--new`: a fresh one).
    """
    from orchestrator.demo import run_demo

    workdir = workdir.resolve()
    # Running the demo again with the same work directory continues it.
    again = f"pairloop demo --workdir {workdir}" + (f" --prompts {prompts}" if prompts else "")
    again += f" --loss {loss}" if loss != "sigmoid" else ""
    with _errors_as_messages(again):
        run_demo(
            workdir,
            iterations=iterations,
            new=new,
            console=console,
            prompts_file=prompts,
            prompt_field=prompt_field,
            loss=loss,
        )


def _api_help() -> str:
    """`api --help`: what it serves, and the environment variables it reads (from its settings)."""
    from orchestrator.settings import OrchestratorSettings

    prefix = OrchestratorSettings.model_config.get("env_prefix", "")
    lines = [
        "Serve the status API (runs: list, show, start, cancel) and best-of-n chat completions.",
        "",
        "\b",
        "Environment (default in brackets):",
    ]
    for name, spec in OrchestratorSettings.model_fields.items():
        if name == "fault_kill_after":  # a test and drill hook, not a deployment setting
            continue
        default = "" if spec.default is None else f" [{spec.default}]"
        lines.append(f"  {prefix}{name.upper()}{default}: {spec.description or name}")
    lines.append(
        "  PAIRLOOP_REDIS_URL [redis://127.0.0.1:6379/0]: the trainer's Celery broker (runs "
        "started here)"
    )
    return "\n".join(lines)


@app.command(help=_api_help())
def api(
    host: Annotated[
        str | None,
        typer.Option(help="Bind address (default: PAIRLOOP_ORCHESTRATOR_HOST, else 127.0.0.1)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Port (default: PAIRLOOP_ORCHESTRATOR_PORT, else 8080)."),
    ] = None,
) -> None:
    import uvicorn

    from orchestrator.api.app import create_app
    from orchestrator.settings import OrchestratorSettings

    settings = OrchestratorSettings()
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_level=settings.log_level.lower(),
    )


@app.command("tiny-models")
def tiny_models(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the models into.")],
    preset: Annotated[str, typer.Option(help="Model size: tiny (~0.2M params) or 100m.")] = "tiny",
    seed: Annotated[
        int, typer.Option(help="Weight seed; the tokenizer does not depend on it.")
    ] = 0,
) -> None:
    """Build tiny Llama- and Mistral-architecture chat models (and a tiny PairRM) offline."""
    from pairloop_local.tiny_models import PRESETS, build_tiny_models

    if preset not in PRESETS:
        raise typer.BadParameter(f"choose one of {sorted(PRESETS)}", param_hint="--preset")
    built = build_tiny_models(out_dir, preset=preset, seed=seed)
    for name, path in built.items():
        console.print(f"[green]built[/green] {name}: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit status (bad flags print a usage message, not a traceback)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    # `--debug` anywhere on the line (`pairloop run X --debug` as well as `pairloop --debug run X`).
    if "--debug" in args:
        args = ["--debug", *(a for a in args if a != "--debug")]
    try:
        app(args=args, prog_name="pairloop")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        if _state["debug"]:
            raise
        err_console.print("[red]interrupted[/red]")
        return 130
    except Exception as exc:  # the last net: a command without its own messages
        if _state["debug"]:
            raise
        err_console.print(
            f"[red]error:[/red] {type(exc).__name__}: {_one_line(str(exc))} "
            "(`pairloop --debug ...` shows the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The `pairloop` command line.

    pairloop run configs/snorkel-mistral-pairrm.yaml   # create a run from a YAML config and execute it
    pairloop run configs/demo.yaml --local             # ... on a stack started on this machine for it
    pairloop resume RUN_DIR [--local]                  # continue after a crash or cancel; redoes nothing finished
    pairloop status [RUN_DIR]                          # one run's stages, or every run under ./runs
    pairloop report RUN_DIR                            # (re)write RUN_DIR/report/report.md and plots
    pairloop cancel RUN_DIR                            # ask a running run to stop at the next safe point
    pairloop demo [--new]                              # the whole loop on this machine: tiny models, local services
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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from orchestrator.plan import Plan

app = typer.Typer(
    name="pairloop",
    help="Iterative DPO with an external ranker: generator, ranker, trainer and the loop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
    return f"pairloop resume {run_dir}{' --local' if local else ''}"


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
    console.print(f"model: {plan.parameters / 1e9:.2f}B parameters ({plan.shape_source})")
    accumulation = plan.gradient_accumulation_steps
    console.print(
        f"trainer: strategy {plan.strategy}, global batch {plan.global_batch_size}, gradient "
        f"accumulation {accumulation if accumulation is not None else '-'} on {plan.gpus} GPUs"
    )


def _check_plan(
    config: Path,
    gpus: int,
    gpu_memory: float,
    model_config: Path | None,
    strategy: str | None = None,
) -> None:
    """Fail (exit 2) before any work when a stage cannot fit the GPUs."""
    from orchestrator.config import ConfigError, load_run_config
    from orchestrator.plan import PlanError, load_shape, plan_run

    try:
        cfg = load_run_config(config)
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
    )
    _print_plan(plan)
    if not plan.fits:
        raise _fail("this run cannot fit these GPUs:\n  " + "\n  ".join(plan.problems), 2)


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="YAML run config (see configs/).")],
    gpus: Annotated[int, typer.Option(min=1, help="GPUs the trainer shards over.")] = 8,
    gpu_memory: Annotated[float, typer.Option(min=1, help="Memory of one GPU, GiB.")] = 80,
    model_config: Annotated[
        Path | None, typer.Option(help="The base model's config.json (default: its own).")
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(help="ddp, fsdp or deepspeed-zero3 (default: dpo.strategy, else fsdp)."),
    ] = None,
) -> None:
    """Estimate each stage's memory per GPU; exit 2 naming the knob to turn if one cannot fit."""
    if strategy not in (None, "ddp", "fsdp", "deepspeed-zero3"):
        raise typer.BadParameter("choose ddp, fsdp or deepspeed-zero3", param_hint="--strategy")
    _check_plan(config, gpus, gpu_memory, model_config, strategy)


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
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="Start the services the config needs on this machine (its `local:` section), "
            "run, and stop them.",
        ),
    ] = False,
) -> None:
    """Create a run from CONFIG and execute it."""
    from orchestrator.runs import create_run

    if gpus is not None:
        _check_plan(config, gpus, gpu_memory, None)
    with _errors_as_messages(None):
        run_dir = create_run(config, run_id=run_id)
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
    if not (run_dir / "manifest.json").is_file():
        raise _fail(f"{run_dir} is not a run directory (no manifest.json)", 2)
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
    runs_root: Annotated[Path, typer.Option(help="Where to list runs.")] = Path("runs"),
) -> None:
    """Show one run's stages, or list the runs under --runs-root."""
    from orchestrator.manifest import load_manifest

    if run_dir is None:
        table = Table(title=f"runs under {runs_root}")
        for col in ("run", "status", "stages done", "updated"):
            table.add_column(col)
        for path in sorted(runs_root.glob("*/manifest.json")):
            m = load_manifest(path.parent)
            done = sum(1 for s in m.stages.values() if s.state == "done")
            table.add_row(m.run_id, m.status, f"{done}/{len(m.stages)}", f"{m.updated_at:.0f}")
        console.print(table)
        return
    try:
        m = load_manifest(run_dir)
    except FileNotFoundError:
        raise _fail(f"{run_dir} is not a run directory (no manifest.json)", 2) from None
    table = Table(title=f"run {m.run_id}: {m.status}" + (f" ({m.error})" if m.error else ""))
    for col in ("stage", "state", "seconds", "attempts", "error"):
        table.add_column(col)
    for name, st in m.stages.items():
        table.add_row(name, st.state, f"{st.seconds:.1f}", str(st.attempts), st.error or "")
    console.print(table)
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
def cancel(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Ask the process executing RUN_DIR to stop at its next safe point."""
    if not (run_dir / "manifest.json").is_file():
        raise _fail(f"{run_dir} is not a run directory (no manifest.json)", 2)
    (run_dir / "CANCEL").write_text("cancel requested\n")
    console.print(f"cancel requested for {run_dir}")


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
) -> None:
    """The embedded default: the whole loop on this machine with tiny models and local services.

    Run again with the same --workdir, it continues an unfinished demo run (`--new`: a fresh one).
    """
    from orchestrator.demo import run_demo

    workdir = workdir.resolve()
    # Running the demo again with the same work directory continues it.
    again = f"pairloop demo --workdir {workdir}" + (f" --prompts {prompts}" if prompts else "")
    with _errors_as_messages(again):
        run_demo(
            workdir,
            iterations=iterations,
            new=new,
            console=console,
            prompts_file=prompts,
            prompt_field=prompt_field,
        )


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (default from settings).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default from settings).")] = None,
) -> None:
    """Serve the status API (runs: list, show, start, cancel) and best-of-n chat completions."""
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

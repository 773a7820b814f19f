"""The `pairloop` command line.

    pairloop tiny-models OUT_DIR          # tiny Llama + Mistral chat models, offline, in seconds
    pairloop tiny-models OUT_DIR --preset 100m

Each command is a thin shell over a library function; heavy imports happen inside the command.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="pairloop",
    help="Iterative DPO with an external ranker: generator, ranker, trainer and the loop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _root() -> None:
    """Iterative DPO with an external ranker."""


@app.command("tiny-models")
def tiny_models(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the models into.")],
    preset: Annotated[str, typer.Option(help="Model size: tiny (~0.2M params) or 100m.")] = "tiny",
    seed: Annotated[
        int, typer.Option(help="Weight seed; the tokenizer does not depend on it.")
    ] = 0,
) -> None:
    """Build tiny Llama- and Mistral-architecture chat models (and a tiny PairRM) offline."""
    from pairloop.tiny_models import PRESETS, build_tiny_models

    if preset not in PRESETS:
        raise typer.BadParameter(f"choose one of {sorted(PRESETS)}", param_hint="--preset")
    built = build_tiny_models(out_dir, preset=preset, seed=seed)
    for name, path in built.items():
        console.print(f"[green]built[/green] {name}: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit status (bad flags print a usage message, not a traceback)."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name="pairloop")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

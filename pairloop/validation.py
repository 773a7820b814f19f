"""The one formatter of pydantic validation errors: each bad field named as the user wrote it.

Every surface that validates user input words its errors through here: the run config (YAML keys,
`orchestrator.config`), service settings (command-line flags, `pairloop.settings`), HTTP bodies
(`pairloop.http`, 400 replies) and the training job (`services.trainer.tasks`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

__all__ = ["FieldError", "describe_validation_error", "field_errors"]

Naming = Literal["dotted", "flag"]


@dataclass(frozen=True)
class FieldError:
    """One problem: where (`sampling.temperature`, `--max-model-len`), what, and pydantic's type."""

    where: str
    message: str
    type: str


def _where(loc: tuple[int | str, ...], naming: Naming, root: str) -> str:
    dotted = ".".join(str(p) for p in loc)
    if not dotted:
        return root
    return f"--{dotted.replace('_', '-')}" if naming == "flag" else dotted


def field_errors(
    exc: pydantic.ValidationError | Sequence[Mapping[str, Any]],
    *,
    naming: Naming = "dotted",
    root: str = "(top level)",
    drop_prefix: Collection[str] = (),
    unknown_field_hint: str | None = None,
) -> list[FieldError]:
    """The errors of `exc` (or its `.errors()`: FastAPI's `RequestValidationError` gives those),
    one per bad field.

    `naming`: "dotted" for YAML/JSON paths (`items.0.prompt`), "flag" for command-line flags
    (`--max-model-len`). `root` names an error of the whole object. `drop_prefix`: location parts
    that mean nothing to the user (FastAPI's leading "body"). `unknown_field_hint` replaces
    pydantic's "Extra inputs are not permitted", to say where the schema is.
    """
    errors = exc.errors() if isinstance(exc, pydantic.ValidationError) else exc
    out = []
    for err in errors:
        loc = tuple(p for p in err.get("loc", ()) if p not in drop_prefix)
        message = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden" and unknown_field_hint:
            message = f"unknown field ({unknown_field_hint})"
        out.append(FieldError(_where(loc, naming, root), str(message), str(err.get("type", ""))))
    return out


def describe_validation_error(
    exc: pydantic.ValidationError,
    *,
    title: str,
    naming: Naming = "dotted",
    root: str = "(top level)",
    unknown_field_hint: str | None = None,
) -> str:
    """`title:` and then one indented `where: message` line per bad field."""
    problems = field_errors(exc, naming=naming, root=root, unknown_field_hint=unknown_field_hint)
    return "\n".join([f"{title}:", *(f"  {p.where}: {p.message}" for p in problems)])

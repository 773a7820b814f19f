"""Confining paths that arrive in requests to a configured root directory."""

from __future__ import annotations

from pathlib import Path

from pairloop.errors import ForbiddenError, ValidationError

__all__ = ["resolve_inside"]


def resolve_inside(root: str | Path, path: str | Path, *, param: str = "path") -> Path:
    """Resolve `path` (absolute, or relative to `root`) and refuse anything outside `root`.

    Symlinks are resolved first, so a link inside the root that points outside is refused too.
    """
    if not str(path).strip():
        raise ValidationError(f"{param} must not be empty", param=param)
    if "\x00" in str(path):
        raise ValidationError(f"{param} contains a NUL byte", param=param)
    root_resolved = Path(root).resolve()
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root_resolved / candidate
    resolved = candidate.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise ForbiddenError(
            f"{param} {str(path)!r} resolves outside the model store root {str(root_resolved)!r}; "
            "use a path inside it",
            param=param,
        )
    return resolved

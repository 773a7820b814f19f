"""Every `type: ignore` in the project names its error code and says why.

mypy itself enforces the code (`ignore-without-code`) and flags stale ones (`warn_unused_ignores`)
in the checked packages; the reason is ours to keep: a comment after the ignore on the same line,
or a comment line right above it.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("pairloop", "pairloop_local", "orchestrator", "services", "bench", "tests")
IGNORE = re.compile(r"#\s*type:\s*ignore(?P<code>\[[a-z, -]+\])?(?P<rest>.*)$")


def unexplained_ignores(files: list[Path], root: Path) -> list[str]:
    """`path:line` of each `type: ignore` without a code, or without a reason beside or above."""
    bad = []
    for path in files:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            match = IGNORE.search(line)
            if match is None or path.name == Path(__file__).name:
                continue
            reason_beside = match["rest"].strip().startswith("#")
            above = lines[number - 2].strip() if number > 1 else ""
            if not match["code"] or not (reason_beside or above.startswith("#")):
                bad.append(f"{path.relative_to(root)}:{number}")
    return bad


def test_every_type_ignore_has_a_code_and_a_reason() -> None:
    files = [p for root in ROOTS for p in sorted((REPO_ROOT / root).rglob("*.py"))]
    assert len(files) > 100  # the scan sees the project
    assert unexplained_ignores(files, REPO_ROOT) == []


def test_the_scan_finds_a_bare_ignore(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text(
        "x = f()  # type: ignore\n"
        "y = g()  # type: ignore[misc]\n"
        "z = h()  # type: ignore[misc]  # h is untyped\n"
        "# h is untyped\n"
        "w = h()  # type: ignore[misc]\n"
    )
    assert unexplained_ignores([sample], tmp_path) == ["m.py:1", "m.py:2"]

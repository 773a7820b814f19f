"""Fixtures of the ranker tests: real `python -m services.ranker` processes on loopback ports, the
tiny PairRM from `pairloop tiny-models`, and llm-blender's own Blender as the reference.

The PairRM server is started once per session. Its caps are small so that the bad-input tests can
cross them, and its batch wait is long enough (100 ms) for concurrent requests to share a batch.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pairloop_local.processes import ManagedProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[3]

PAIRRM_CAPS = {"max_items": 8, "max_candidates": 6, "max_body_bytes": 64 * 1024}

_VOCABULARY = (
    "the sea sky blue light rainbow forms water sun rain cook tips learning three poem short "
    "write explain detective story capital france paris translate morning spanish planets solar "
    "system order healthy breakfast scatter red python sort list painter famous quick brown fox "
    "jumps lazy dog helpful assistant answers clearly kindly email meeting week thank you help"
)
_WORDS = _VOCABULARY.split()


@contextlib.contextmanager
def run_ranker(args: Sequence[str], log_dir: Path, *, timeout: float = 120.0) -> Iterator[str]:
    """Start `python -m services.ranker ARGS` on a free port; yield its base URL; always stop it."""
    port = free_port()
    # One thread per process: tiny models gain nothing from more, and tests share 2 cores.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    proc = ManagedProcess(
        "ranker",
        [sys.executable, "-m", "services.ranker", "--port", str(port), *args],
        log_path=log_dir / "ranker.log",
        env=env,
        cwd=REPO_ROOT,
    )
    proc.start()
    try:
        proc.wait_ready(f"http://127.0.0.1:{port}/ready", timeout=timeout)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words)).capitalize() + "."


def make_items(seed: int, n_items: int, n_candidates: int) -> tuple[list[str], list[list[str]]]:
    """Prompts and distinct candidates of varied lengths (deterministic in `seed`)."""
    rng = random.Random(seed)
    prompts = [text(rng, rng.randint(4, 16)) for _ in range(n_items)]
    candidates = []
    for _ in range(n_items):
        cands: list[str] = []
        while len(cands) < n_candidates:
            c = text(rng, rng.randint(2, 30))
            if c not in cands:
                cands.append(c)
        candidates.append(cands)
    return prompts, candidates


def metric(body: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@pytest.fixture(scope="session")
def pairrm_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["pairrm"]


@pytest.fixture(scope="session")
def reference_blender(pairrm_dir: Path) -> Any:
    """llm-blender's own Blender, loaded by its own `loadranker` from the same checkpoint."""
    from services.ranker.blender_adapter import load_blender

    return load_blender(str(pairrm_dir), device="cpu")


@pytest.fixture(scope="session")
def pairrm_url(pairrm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = [
        "--model", str(pairrm_dir),
        "--batch-wait-ms", "100",
        "--batch-size", "64",
        "--max-items", str(PAIRRM_CAPS["max_items"]),
        "--max-candidates", str(PAIRRM_CAPS["max_candidates"]),
        "--max-body-bytes", str(PAIRRM_CAPS["max_body_bytes"]),
    ]  # fmt: skip
    with run_ranker(args, tmp_path_factory.mktemp("pairrm-server")) as url:
        yield url


# Test modules cannot import this conftest (importlib import mode): helpers come as fixtures.
@pytest.fixture(scope="session")
def start_ranker() -> Any:
    return run_ranker


@pytest.fixture(scope="session")
def items_factory() -> Any:
    return make_items


@pytest.fixture(scope="session")
def read_metric() -> Any:
    return metric

"""Fixtures of the generator tests: one real service process per session, HF references.

`generator` starts `python -m services.generator` once (real vLLM on CPU, real uvicorn on a free
loopback port) over a temporary model store holding two tiny Llama checkpoints that differ only
in their weight seed. Tests that swap record which checkpoint each version label means
(`generator.swap_to`), so any test can compare a response with Hugging Face transformers' greedy
output for the weights its `weight_version` names, whatever ran before it.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pairloop_local.processes import ManagedProcess, ProcessFailedError, free_port

ADMIN_TOKEN = "test-admin-token"
MAX_N = 4
MAX_TOKENS_LIMIT = 1000
MAX_BATCH_PROMPTS = 16
MAX_BODY_BYTES = 256 * 1024
# Above vLLM's default per-step token budget with chunked prefill (2048), so one prompt can be
# longer than that budget (test_long_seeded_prompts); the models' own context is 4096.
MAX_MODEL_LEN = 3072
MODEL_CONTEXT = 4096
STARTUP_TIMEOUT_S = 240.0


@dataclass
class GeneratorService:
    """A running generator process and what the tests know about its weights."""

    base_url: str
    model_root: Path
    model_name: str
    log_path: Path
    process: ManagedProcess
    # weight version label -> checkpoint directory it was loaded from
    versions: dict[str, Path] = field(default_factory=dict)
    # HTTP statuses /ready answered while the service started, in order
    ready_statuses_during_start: list[int] = field(default_factory=list)
    health_while_loading: dict[str, Any] | None = None
    _labels: Iterator[int] = field(default_factory=itertools.count)

    @property
    def seed_dirs(self) -> tuple[Path, Path]:
        return self.model_root / "seed0", self.model_root / "seed1"

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def current_version(self) -> str:
        r = httpx.get(f"{self.base_url}/v1/models", timeout=10)
        r.raise_for_status()
        return str(r.json()["data"][0]["weight_version"])

    def current_dir(self) -> Path:
        return self.versions[self.current_version()]

    def other_dir(self) -> Path:
        """The seed checkpoint that is not serving now."""
        a, b = self.seed_dirs
        return b if self.current_dir() == a else a

    def new_version(self, stem: str) -> str:
        return f"{stem}-{next(self._labels)}"

    def record(self, version: str, path: Path) -> None:
        self.versions[version] = path

    def swap_to(self, path: Path, *, mode: str | None = None) -> dict[str, Any]:
        version = self.new_version(path.name)
        body: dict[str, Any] = {"path": path.name, "version": version}
        if mode:
            body["mode"] = mode
        r = httpx.post(
            f"{self.base_url}/admin/weights", json=body, headers=self.admin_headers(), timeout=120
        )
        assert r.status_code == 200, r.text
        self.record(version, path)
        return dict(r.json())

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{label="v"}': value}."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store root with seed0 and seed1 tiny Llama checkpoints (same shapes and names)."""
    from pairloop_local.tiny_models import build_tiny_chat_model

    root = tmp_path_factory.mktemp("model-store")
    for seed in (0, 1):
        build_tiny_chat_model(
            root / f"seed{seed}", arch="llama", seed=seed, max_position_embeddings=MODEL_CONTEXT
        )
    return root


def service_env(scratch: Path) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        VLLM_CACHE_ROOT=str(scratch / "vllm-cache"),
        TMPDIR=str(scratch / "tmp"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    (scratch / "tmp").mkdir(parents=True, exist_ok=True)
    return env


def launch_generator(
    model_store: Path, scratch: Path, *, extra_args: tuple[str, ...] = ()
) -> GeneratorService:
    """Start `python -m services.generator` over `model_store` serving seed0; ready on return.
    The caller stops `service.process`."""
    port = free_port()
    argv = [
        sys.executable, "-m", "services.generator",
        "--model", str(model_store / "seed0"),
        "--port", str(port),
        "--model-root", str(model_store),
        "--admin-token", ADMIN_TOKEN,
        "--served-model-name", "tiny-llama",
        "--dtype", "float32",
        "--cpu-threads", "1",
        "--kv-cache-bytes", str(64 << 20),
        "--max-model-len", str(MAX_MODEL_LEN),
        # Two sequences per engine step: concurrent requests queue inside vLLM, which keeps them
        # in flight for seconds, so swap tests overlap them even on a starved shared host.
        "--max-num-seqs", "2",
        "--max-n", str(MAX_N),
        "--max-tokens-limit", str(MAX_TOKENS_LIMIT),
        "--max-batch-prompts", str(MAX_BATCH_PROMPTS),
        "--max-body-bytes", str(MAX_BODY_BYTES),
        "--swap-drain-timeout-s", "120",
        "--no-access-log",
        *extra_args,
    ]  # fmt: skip
    proc = ManagedProcess(
        "generator", argv, log_path=scratch / "generator.log", env=service_env(scratch)
    )
    service = GeneratorService(
        base_url=f"http://127.0.0.1:{port}",
        model_root=model_store,
        model_name="tiny-llama",
        log_path=proc.log_path,
        process=proc,
    )
    service.record("base", model_store / "seed0")
    proc.start()
    try:
        _watch_startup(service)
    except BaseException:
        proc.stop()
        raise
    return service


@pytest.fixture(scope="session")
def generator(
    model_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GeneratorService]:
    service = launch_generator(model_store, tmp_path_factory.mktemp("generator-service"))
    try:
        yield service
    finally:
        service.process.stop()


def _watch_startup(service: GeneratorService) -> None:
    """Poll /ready from process start until 200, recording what it answered on the way."""
    proc = service.process
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise ProcessFailedError(f"generator exited during start:\n{proc.log_tail()}")
            try:
                r = client.get(f"{service.base_url}/ready")
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            service.ready_statuses_during_start.append(r.status_code)
            if r.status_code == 200:
                return
            if service.health_while_loading is None:
                h = client.get(f"{service.base_url}/health")
                service.health_while_loading = {"http_status": h.status_code, **h.json()}
            time.sleep(0.05)
    proc.stop()
    raise ProcessFailedError(f"generator not ready in {STARTUP_TIMEOUT_S:.0f}s:\n{proc.log_tail()}")


# --- Hugging Face references -------------------------------------------------------------------


class HFReference:
    """Greedy generation with transformers, the ground truth for 'the service used these weights'."""

    def __init__(self) -> None:
        import torch

        # One thread: on a busy 2-core host, tiny models decode 40x faster than with two.
        torch.set_num_threads(1)
        self._models: dict[Path, Any] = {}
        self._tokenizers: dict[Path, Any] = {}
        self._cache: dict[tuple[Path, tuple[int, ...], int, int], str] = {}

    def tokenizer(self, model_dir: Path) -> Any:
        from transformers import AutoTokenizer

        if model_dir not in self._tokenizers:
            self._tokenizers[model_dir] = AutoTokenizer.from_pretrained(model_dir)
        return self._tokenizers[model_dir]

    def chat_ids(self, model_dir: Path, messages: list[dict[str, str]]) -> list[int]:
        tok = self.tokenizer(model_dir)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def greedy(
        self, model_dir: Path, prompt_ids: list[int], *, max_new: int, min_new: int = 0
    ) -> str:
        import torch
        from transformers import AutoModelForCausalLM

        key = (model_dir, tuple(prompt_ids), max_new, min_new)
        if key not in self._cache:
            if model_dir not in self._models:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
                self._models[model_dir] = model.eval()
            model = self._models[model_dir]
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([prompt_ids]),
                    max_new_tokens=max_new,
                    min_new_tokens=min_new or None,
                    do_sample=False,
                )
            new = out[0, len(prompt_ids) :].tolist()
            text = self.tokenizer(model_dir).decode(new, skip_special_tokens=True)
            self._cache[key] = self.settled(text)
        return self._cache[key]

    @staticmethod
    def settled(text: str) -> str:
        """`text` without a trailing partial UTF-8 character. vLLM's incremental detokenizer holds
        back bytes that do not complete a character yet (and a length cut-off leaves them so);
        a one-shot decode renders them as U+FFFD. Byte-level BPE on a random model hits this."""
        return text.rstrip("\ufffd")

    def greedy_chat(
        self, model_dir: Path, messages: list[dict[str, str]], *, max_new: int, min_new: int = 0
    ) -> str:
        return self.greedy(
            model_dir, self.chat_ids(model_dir, messages), max_new=max_new, min_new=min_new
        )


@pytest.fixture(scope="session")
def hf() -> HFReference:
    return HFReference()


@pytest.fixture()
def store_copy(model_store: Path) -> Iterator[Any]:
    """Make a throw-away checkpoint inside the store (a copy of seed1), removed after the test."""
    made: list[Path] = []

    def copy(name: str) -> Path:
        dst = model_store / name
        shutil.copytree(model_store / "seed1", dst)
        made.append(dst)
        return dst

    yield copy
    for path in made:
        shutil.rmtree(path, ignore_errors=True)

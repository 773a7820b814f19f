"""Shared by the generator benchmarks: tiny checkpoints, the service's command line and environment.

Both benchmarks start the real service (`python -m services.generator`) the way a deployment
would, with CPU-sized engine settings; the in-process side of `bench.generator_throughput` builds
its engine from the very same settings object, so both sides run identical engine arguments.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from pairloop_local.processes import ManagedProcess, ProcessFailedError, free_port
from pairloop_local.tiny_models import build_tiny_chat_model

__all__ = [
    "ADMIN_TOKEN",
    "RESULTS",
    "ServiceSpec",
    "build_store",
    "make_console",
    "rich_table",
    "service_env",
    "start_service",
    "wait_ready",
]

RESULTS = Path(__file__).resolve().parent / "results"
ADMIN_TOKEN = "bench-admin-token"


class ServiceSpec:
    """Flags of one generator service: the model, the store it may swap from, engine sizing."""

    def __init__(
        self,
        *,
        model: Path,
        model_root: Path,
        cpu_threads: int,
        max_model_len: int,
        kv_cache_bytes: int,
        max_num_seqs: int | None = None,
    ) -> None:
        self.model = model
        self.model_root = model_root
        self.cpu_threads = cpu_threads
        self.max_model_len = max_model_len
        self.kv_cache_bytes = kv_cache_bytes
        self.max_num_seqs = max_num_seqs

    def flags(self) -> dict[str, str]:
        """Settings as `--flag value` pairs; `GeneratorSettings` takes the same names."""
        out = {
            "model": str(self.model),
            "model_root": str(self.model_root),
            "admin_token": ADMIN_TOKEN,
            "served_model_name": "bench",
            "dtype": "float32",
            "cpu_threads": str(self.cpu_threads),
            "kv_cache_bytes": str(self.kv_cache_bytes),
            "max_model_len": str(self.max_model_len),
            # The throughput bench sends every prompt at once; the default cap (1024) is enough.
            "max_tokens_limit": str(self.max_model_len),
        }
        if self.max_num_seqs is not None:
            out["max_num_seqs"] = str(self.max_num_seqs)
        return out

    def argv(self, port: int) -> list[str]:
        argv = [sys.executable, "-m", "services.generator", "--port", str(port)]
        for key, value in self.flags().items():
            argv += [f"--{key.replace('_', '-')}", value]
        return [*argv, "--no-access-log", "--log-level", "WARNING"]


def build_store(root: Path, preset: str) -> tuple[Path, Path]:
    """Two checkpoints of `preset` that differ only in their weight seed (a swap's two ends)."""
    dirs = (root / f"{preset}-seed0", root / f"{preset}-seed1")
    for seed, path in enumerate(dirs):
        if not (path / "config.json").exists():
            build_tiny_chat_model(path, arch="llama", preset=preset, seed=seed)
    return dirs


def service_env(scratch: Path, cpu_threads: int) -> dict[str, str]:
    """The service's environment: offline, vLLM's caches and temp files under `scratch`."""
    (scratch / "tmp").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(cpu_threads),
        VLLM_CACHE_ROOT=str(scratch / "vllm-cache"),
        TMPDIR=str(scratch / "tmp"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def start_service(spec: ServiceSpec, scratch: Path, name: str) -> tuple[ManagedProcess, str]:
    """Spawn the service (not waiting for it); returns the process and its base URL."""
    port = free_port()
    proc = ManagedProcess(
        name,
        spec.argv(port),
        log_path=scratch / f"{name}.log",
        env=service_env(scratch, spec.cpu_threads),
    )
    proc.start()
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: ManagedProcess, url: str, *, timeout: float = 600.0) -> None:
    """Poll /ready every 50 ms: the start takes tens of seconds, so that is its error, and faster
    polling steals CPU from the start being measured (every 503 is a log line)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise ProcessFailedError(f"{proc.name} exited while starting:\n{proc.log_tail()}")
            try:
                if client.get(f"{url}/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    proc.stop()
    raise ProcessFailedError(f"{proc.name} not ready in {timeout:.0f}s:\n{proc.log_tail()}")


def make_console() -> Console:
    """A console wide enough for the tables when output goes to a file or pipe (default 80)."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def rich_table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table

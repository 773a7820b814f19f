"""Everything a stage needs, in one object: config, run directory, manifest, clients, progress."""

from __future__ import annotations

import itertools
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from orchestrator.clients import GeneratorClient, RankerClient, TrainerClient
from orchestrator.config import RunConfig
from orchestrator.manifest import Manifest

__all__ = ["CANCEL_FILE", "RunCancelledError", "RunContext", "make_progress"]

CANCEL_FILE = "CANCEL"


class RunCancelledError(RuntimeError):
    """Someone asked the run to stop (`pairloop cancel`, the status API): it stops at a safe point."""


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


@dataclass
class RunContext:
    run_dir: Path
    cfg: RunConfig
    manifest: Manifest
    generators: list[GeneratorClient]
    ranker: RankerClient
    trainer: TrainerClient
    console: Console
    progress: Progress
    fault_kill_after: str | None = None
    make_generator: Callable[[str], GeneratorClient] | None = None
    judge_client: RankerClient | None = None  # evaluation.judge; None: the run's ranker judges
    # "PairRM llm-blender/PairRM" per ranker address, from its /ready (addresses change per start).
    ranker_labels: dict[str, str] = field(default_factory=dict)
    # Model replicas behind the run's ranker address (its /ready `replicas`; 1 if not reported).
    ranker_replicas: int = 1
    # Set when the run is being interrupted: threads that wait on services (training) stop.
    stopping: threading.Event = field(default_factory=threading.Event)
    _rr: itertools.cycle[GeneratorClient] = field(init=False, repr=False)
    _events: Counter[str] = field(default_factory=Counter, init=False, repr=False)

    def __post_init__(self) -> None:
        self._rr = itertools.cycle(self.generators)

    @property
    def judge(self) -> RankerClient:
        """The ranker service that judges evaluations (`evaluation.judge`, else the run's)."""
        return self.judge_client or self.ranker

    @property
    def judge_label(self) -> str:
        """The judge by its kind and model (`scorer plain_prose`), not by its address."""
        url = self.judge.base_url
        return self.ranker_labels.get(url, f"ranker at {url}")

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    def next_generator(self) -> GeneratorClient:
        """Round-robin over the generator replicas."""
        return next(self._rr)

    def checkpoint_event(self, stage: str) -> None:
        """Count a durable step of `stage` (a shard written, a training progress report).

        With `fault_kill_after` = 'STAGE:N' the process SIGKILLs itself at the Nth event: a real
        crash at a precise point, which is how the resume tests stop it mid-stage.
        """
        self._events[stage] += 1
        if self.fault_kill_after == f"{stage}:{self._events[stage]}":
            os.kill(os.getpid(), signal.SIGKILL)

    async def refresh_generators(self) -> None:
        """Re-resolve the replicas (headless-Service DNS); new ones get clients, gone ones close."""
        from orchestrator.discovery import generator_urls

        if self.make_generator is None or not self.cfg.services.generator_dns:
            return
        urls = generator_urls(self.cfg.services)
        current = {g.base_url: g for g in self.generators}
        if list(current) == urls:
            return
        for url, client in current.items():
            if url not in urls:
                await client.aclose()
        self.generators = [current.get(url) or self.make_generator(url) for url in urls]
        self._rr = itertools.cycle(self.generators)

    def save(self) -> None:
        self.manifest.save(self.run_dir)

    def check_cancel(self) -> None:
        if (self.run_dir / CANCEL_FILE).exists():
            raise RunCancelledError(f"run {self.run_id} was cancelled")

    def version_label(self, k: int) -> str:
        """Weight version of policy k (0 = base): what the generator must report for it."""
        return f"{self.run_id}.policy{k}"

    def policy_path(self, k: int) -> Path:
        return Path(self.cfg.base_model) if k == 0 else self.run_dir / "checkpoints" / f"policy{k}"

    def iter_dir(self, k: int) -> Path:
        return self.run_dir / f"iter{k}"

    @property
    def dataset_dir(self) -> Path:
        return self.run_dir / "dataset"

    def service_seconds(self) -> float:
        return (
            sum(g.service_seconds for g in self.generators)
            + self.ranker.service_seconds
            + (self.judge_client.service_seconds if self.judge_client else 0.0)
            + self.trainer.service_seconds
        )

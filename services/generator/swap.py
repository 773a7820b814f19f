"""In-place weight swaps: validate, close the gate, reload, reset the prefix cache, relabel, reopen.

    POST /admin/weights {"path": "run1/iter1", "version": "iter1"}   (bearer token)

1. one swap at a time (a second one gets 409 while the first runs);
2. `path` must resolve inside the model store root;
3. the checkpoint's safetensors headers and config.json are checked against the weights the engine
   started with (names, shapes, dtypes, architecture) before anything touches the engine: vLLM
   loads a checkpoint with a missing tensor "successfully" (mixed weights) and dies on others;
4. the gate closes: new requests wait; in-flight ones finish on the old weights (mode `wait`) or
   are aborted in the engine and re-run on the new weights (mode `abort`);
5. vLLM's pause -> `reload_weights` -> prefix cache reset -> weight version -> resume;
6. if vLLM still fails to load it, the previous weights are reloaded (rollback) and the reply says
   why; if even that fails the engine is declared dead (/ready 503). The process never restarts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pairloop.checkpoints import CheckpointManifest, compare_checkpoints, read_manifest
from pairloop.contracts.generator import WeightSwapRequest, WeightSwapResponse
from pairloop.errors import (
    ConflictError,
    EngineDeadError,
    ServiceUnavailableError,
    ValidationError,
)
from pairloop.paths import resolve_inside
from services.generator.engine_types import ReloadError
from services.generator.gate import DrainTimeoutError, SwapGate
from services.generator.metrics import GeneratorMetrics
from services.generator.settings import SwapMode

if TYPE_CHECKING:
    from services.generator.engine import VllmEngine

__all__ = ["WeightSwapper"]

log = logging.getLogger(__name__)

_MAX_PROBLEMS_SHOWN = 8


class WeightSwapper:
    def __init__(
        self,
        *,
        engine: VllmEngine,
        gate: SwapGate,
        metrics: GeneratorMetrics,
        base_manifest: CheckpointManifest,
        model_root: Path | None,
        default_mode: SwapMode,
        drain_timeout: float,
    ) -> None:
        self.engine = engine
        self.gate = gate
        self.metrics = metrics
        self.base_manifest = base_manifest
        self.model_root = model_root
        self.default_mode = default_mode
        self.drain_timeout = drain_timeout
        # Where the weights being served now came from: the rollback target.
        self.current_path = engine.weights_dir
        self._lock = asyncio.Lock()
        self._pending: str | None = None
        metrics.set_version(gate.version, str(self.current_path))

    @asynccontextmanager
    async def operation(self, what: str) -> AsyncIterator[None]:
        """One weight operation at a time (a swap, a release, a wake): a second gets 409."""
        if self._lock.locked():
            self.metrics.swaps.labels(outcome="conflict").inc()
            raise ConflictError(f"{self._pending} is running; retry when it has finished")
        async with self._lock:
            self._pending = what
            self.metrics.swap_in_progress.set(1)
            try:
                yield
            finally:
                self._pending = None
                self.metrics.swap_in_progress.set(0)

    async def swap(self, request: WeightSwapRequest) -> WeightSwapResponse:
        async with self.operation(f"a weight swap to version {request.version!r}"):
            return await self.swap_locked(request)

    async def swap_locked(self, request: WeightSwapRequest) -> WeightSwapResponse:
        """The swap itself; the caller holds `operation` (a wake of a serving engine calls it)."""
        started = time.perf_counter()
        dead = self.engine.dead_reason
        if dead is not None:
            raise EngineDeadError(f"engine dead: {dead}; restart the service")
        if self.model_root is None:
            raise ServiceUnavailableError(
                "weight swaps are disabled: start the service with --model-root DIR"
            )
        path = resolve_inside(self.model_root, request.path)
        previous = self.gate.version
        if request.version == previous:
            if path == self.current_path:  # a retried request: already done
                return WeightSwapResponse(
                    version=previous,
                    previous_version=previous,
                    path=str(path),
                    seconds=time.perf_counter() - started,
                    paused_seconds=0.0,
                )
            raise ConflictError(
                f"version {previous!r} is already serving (from {self.current_path}); "
                "give the new weights a new version",
                param="version",
            )
        await self.validate(path)

        mode = request.mode or self.default_mode
        closed_at = time.perf_counter()
        try:
            async with self.gate.exclusive(
                abort=self.engine.abort if mode == "abort" else None,
                drain_timeout=self.drain_timeout,
            ) as window:
                await self.engine.pause(mode)
                try:
                    await self.reload_or_roll_back(path, request.version)
                finally:
                    if self.engine.dead_reason is None:
                        await self.engine.resume()
                window.set_version(request.version)
        except DrainTimeoutError as exc:
            self.metrics.swaps.labels(outcome="timeout").inc()
            raise ServiceUnavailableError(
                f"{exc}; nothing changed, still serving version {previous!r}: retry later, "
                "or swap with mode=abort"
            ) from None
        reopened_at = time.perf_counter()
        self.current_path = path
        seconds = reopened_at - started
        self.metrics.swaps.labels(outcome="ok").inc()
        self.metrics.swap_seconds.observe(seconds)
        self.metrics.set_version(request.version, str(path))
        log.info(
            "swapped weights %s -> %s from %s in %.3fs (mode %s, %d requests re-run)",
            previous,
            request.version,
            path,
            seconds,
            mode,
            window.requeued_requests,
        )
        return WeightSwapResponse(
            version=request.version,
            previous_version=previous,
            path=str(path),
            seconds=seconds,
            paused_seconds=reopened_at - closed_at,
            requeued_requests=window.requeued_requests,
        )

    async def validate(self, path: Path) -> None:
        """Refuse a checkpoint that cannot replace the running weights, before touching vLLM."""
        still = f"still serving version {self.gate.version!r}"
        try:
            manifest = await asyncio.to_thread(read_manifest, path)
        except ValidationError as exc:
            self.metrics.swaps.labels(outcome="invalid").inc()
            raise ValidationError(f"{exc.message}; {still}", param="path") from None
        problems = compare_checkpoints(self.base_manifest, manifest)
        if problems:
            self.metrics.swaps.labels(outcome="invalid").inc()
            shown = "; ".join(problems[:_MAX_PROBLEMS_SHOWN])
            more = len(problems) - _MAX_PROBLEMS_SHOWN
            raise ValidationError(
                f"checkpoint {path} does not fit the running model: {shown}"
                + (f"; and {more} more" if more > 0 else "")
                + f"; {still}",
                param="path",
            )

    async def reload_or_roll_back(self, path: Path, version: str) -> None:
        """Reload `path` in place as `version`; on failure reload the current weights, or declare
        the engine dead. Callers validate `path` first and hold the gate (see `swap`)."""
        try:
            await self.engine.reload_weights(path)
        except ReloadError as exc:
            reason = str(exc)
            log.error(
                "reloading %s failed (%s); rolling back to %s", path, reason, self.current_path
            )
            await self.roll_back(reason)
            self.metrics.swaps.labels(outcome="rolled_back").inc()
            raise ValidationError(
                f"vLLM could not load {path}: {reason}; rolled back, still serving version "
                f"{self.gate.version!r}",
                param="path",
            ) from None
        except EngineDeadError:
            self.declare_dead(f"the engine died while loading {path}")
            raise
        # Prefix-cached KV blocks were computed by the old weights: they must not serve the new.
        await self.engine.reset_prefix_cache()
        await self.engine.set_version(version)

    async def roll_back(self, reason: str) -> None:
        """Reload the weights that were serving before a failed reload (or die trying)."""
        try:
            await self.engine.reload_weights(self.current_path)
            await self.engine.reset_prefix_cache()
        except (ReloadError, EngineDeadError) as exc:
            self.declare_dead(
                f"a failed reload ({reason}) could not be rolled back to {self.current_path} ({exc})"
            )
            raise EngineDeadError(
                f"the new weights failed to load ({reason}) and the previous ones could not be "
                f"reloaded ({exc}); the engine is dead: restart the service"
            ) from None

    def declare_dead(self, reason: str) -> None:
        log.critical("engine dead: %s", reason)
        self.engine.mark_dead(reason)
        self.metrics.swaps.labels(outcome="engine_dead").inc()
        self.metrics.engine_ready.set(0)

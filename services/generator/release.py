"""Release and wake: the engine gives its memory back for training, then serves the new policy.

    POST /admin/release                                                  (bearer token)
    POST /admin/wake {"path": "runs/r1/checkpoints/policy1", "version": "r1.policy1"}

Time-shared placement (one node, every GPU busy in every phase): after generation and ranking the
orchestrator releases the generator, so the trainer's ranks get every GPU, and wakes it after
training straight onto the new policy. The wake is the swap: the same checkpoint validation, the
version label, and the rollback (a checkpoint that fails to load: the previous weights come back
and serve, and the reply says why).

How memory is freed is the engine adapter's business (`VllmEngine.release` / `wake_onto`): vLLM's
sleep mode level 2 on a GPU, an engine shutdown where sleep mode does not exist (CPU).

- one weight operation at a time (swap, release, wake share the swapper's lock: 409 otherwise);
- release: the gate closes, in-flight requests finish (mode `wait`) or are stopped (`abort`),
  then the gate refuses: every request until the wake gets 503 with Retry-After, never an answer
  from weights that are not there;
- both are idempotent: releasing a released engine, or waking onto the version that serves from
  the same path, changes nothing; a wake of a serving engine is a weight swap. So the
  orchestrator can repeat either after a crash without asking first.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pairloop.contracts.generator import (
    EngineState,
    ReleaseRequest,
    ReleaseResponse,
    WakeRequest,
    WakeResponse,
)
from pairloop.errors import (
    ClientError,
    ConflictError,
    EngineDeadError,
    EngineReleasedError,
    ServiceUnavailableError,
    ValidationError,
)
from pairloop.paths import resolve_inside
from services.generator.engine_types import ReloadError
from services.generator.gate import DrainTimeoutError

if TYPE_CHECKING:
    from services.generator.swap import WeightSwapper

__all__ = ["ReleaseController"]

log = logging.getLogger(__name__)

_DOING = {"releasing": "is being released", "released": "is released", "waking": "is waking up"}


class ReleaseController:
    """The engine's serving state, and the release and wake operations that change it."""

    def __init__(self, swapper: WeightSwapper, *, retry_after_s: int) -> None:
        self.swapper = swapper
        self.engine = swapper.engine
        self.gate = swapper.gate
        self.metrics = swapper.metrics
        self.retry_after_s = retry_after_s
        self.state: EngineState = "serving"

    def unavailable(self) -> EngineReleasedError:
        """The 503 a request gets while the engine is not serving."""
        return EngineReleasedError(
            f"the engine {_DOING.get(self.state, 'is not serving')} (state: {self.state}; "
            "time-shared placement: its memory is given to training until POST /admin/wake); "
            f"retry in {self.retry_after_s}s",
            retry_after=self.retry_after_s,
        )

    def _check_alive(self) -> None:
        dead = self.engine.dead_reason
        if dead is not None:
            raise EngineDeadError(f"engine dead: {dead}; restart the service")

    async def release(self, request: ReleaseRequest) -> ReleaseResponse:
        """Drain (or abort) requests, then free the engine's memory; a no-op when released."""
        started = time.perf_counter()
        async with self.swapper.operation("a release"):
            self._check_alive()
            version = self.gate.version
            if self.state == "released":
                self.metrics.releases.labels(outcome="noop").inc()
                return ReleaseResponse(
                    state="released",
                    version=version,
                    how=self.engine.release_mode,
                    seconds=time.perf_counter() - started,
                    already_released=True,
                )
            if self.swapper.model_root is None:
                raise ServiceUnavailableError(
                    "release is disabled: a wake loads from the model store; start the service "
                    "with --model-root DIR"
                )
            mode = request.mode or self.swapper.default_mode
            self.state = "releasing"
            try:
                async with self.gate.exclusive(
                    abort=self.engine.abort if mode == "abort" else None,
                    drain_timeout=self.swapper.drain_timeout,
                ):
                    # Requests waiting behind the release must not run once the gate reopens.
                    self.gate.refuse(self.unavailable)
                    try:
                        await self.engine.release()
                    except BaseException:
                        self.gate.admit()
                        raise
            except DrainTimeoutError as exc:
                self.state = "serving"
                self.metrics.releases.labels(outcome="timeout").inc()
                raise ServiceUnavailableError(
                    f"{exc}; nothing changed, still serving version {version!r}: retry later, "
                    "or release with mode=abort"
                ) from None
            except BaseException:
                self.state = "serving"
                raise
            self.state = "released"
        seconds = time.perf_counter() - started
        self.metrics.releases.labels(outcome="ok").inc()
        self.metrics.release_seconds.observe(seconds)
        self.metrics.released.set(1)
        self.metrics.engine_ready.set(0)
        log.info(
            "released the engine (%s) serving %s in %.3fs",
            self.engine.release_mode,
            version,
            seconds,
        )
        return ReleaseResponse(
            state="released", version=version, how=self.engine.release_mode, seconds=seconds
        )

    async def wake(self, request: WakeRequest) -> WakeResponse:
        """Serve again, from `request.path` as `request.version` (the swap's checks), or from the
        previous weights if that checkpoint cannot be loaded (then a 400 says why)."""
        async with self.swapper.operation(f"a wake onto version {request.version!r}"):
            if self.state == "serving":
                # Never released (or a restarted service): the wake is a plain swap.
                swapped = await self.swapper.swap_locked(request)
                self.metrics.wakes.labels(outcome="swapped").inc()
                return WakeResponse(**swapped.model_dump(), woke=False)
            return await self._wake(request)

    async def _wake(self, request: WakeRequest) -> WakeResponse:
        started = time.perf_counter()
        self._check_alive()
        assert self.swapper.model_root is not None  # release refuses without it
        previous, previous_path = self.gate.version, self.swapper.current_path
        self.state = "waking"
        failure: str | None = None
        path = previous_path
        try:
            path = resolve_inside(self.swapper.model_root, request.path)
            if request.version == previous and path != previous_path:
                raise ConflictError(
                    f"version {previous!r} was serving from {previous_path}; give the new "
                    "weights a new version"
                )
            await self.swapper.validate(path)
        except ClientError as exc:
            failure = f"cannot wake onto {request.path}: {exc.message}"
        async with self.gate.exclusive(abort=None, drain_timeout=self.swapper.drain_timeout) as w:
            if failure is None:
                try:
                    await self.engine.wake_onto(path)
                except ReloadError as exc:
                    failure = f"vLLM could not load {path}: {exc}"
                    log.error(
                        "waking onto %s failed (%s); waking onto %s", path, exc, previous_path
                    )
                except EngineDeadError:
                    self._die(f"the engine died while waking onto {path}")
                    raise
            if failure is not None:
                try:
                    await self.engine.wake_onto(previous_path)
                except (ReloadError, EngineDeadError) as exc:
                    reason = f"{failure}; and waking onto the previous weights failed too ({exc})"
                    self._die(reason)
                    raise EngineDeadError(
                        f"{reason}: the engine is dead, restart the service"
                    ) from None
            version = previous if failure is not None else request.version
            await self.engine.set_version(version)
            w.set_version(version)
            self.gate.admit()
            self.state = "serving"
        seconds = time.perf_counter() - started
        self.metrics.released.set(0)
        self.metrics.engine_ready.set(1)
        self.metrics.wake_seconds.observe(seconds)
        if failure is not None:
            self.metrics.wakes.labels(outcome="rolled_back").inc()
            raise ValidationError(
                f"{failure}; woke onto the previous weights instead: serving version {previous!r}",
                param="path",
            )
        self.swapper.current_path = path
        self.metrics.set_version(version, str(path))
        self.metrics.wakes.labels(outcome="ok").inc()
        log.info("woke onto %s from %s in %.3fs (was %s)", version, path, seconds, previous)
        return WakeResponse(
            version=version,
            previous_version=previous,
            path=str(path),
            seconds=seconds,
            paused_seconds=seconds,
            woke=True,
        )

    def _die(self, reason: str) -> None:
        self.gate.admit()  # the dead engine's own 503 (restart) answers from now on
        self.metrics.wakes.labels(outcome="engine_dead").inc()
        self.swapper.declare_dead(reason)

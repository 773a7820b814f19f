"""Running generation requests through the swap gate: caps, sampling specs, re-runs, streams.

Routes turn HTTP bodies into token ids (`VllmEngine.render_chat` / `encode_prompt`) and call
`GenerationService.sampling_specs`, then either `run` (whole answers; re-run transparently when a
swap in abort mode stopped them) or `open_stream` + `stream_deltas` (token deltas, never re-run).
Every answer is labelled with `lease.version`: the gate guarantees no swap happened in between.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pairloop.contracts.generator import SamplingFields
from pairloop.errors import ServerError, ValidationError
from services.generator.engine_types import EngineStep, SampleDelta, SamplingSpec, TokenLogprob
from services.generator.gate import Lease, SwapGate
from services.generator.metrics import GeneratorMetrics

if TYPE_CHECKING:
    from services.generator.engine import VllmEngine

__all__ = ["GenerationService", "Limits", "PromptResult", "RunResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Per-request caps from the settings, and the engine's context length."""

    max_n: int
    max_tokens_limit: int
    default_max_tokens: int
    max_batch_prompts: int
    max_model_len: int


@dataclass(frozen=True)
class PromptResult:
    """One prompt's samples (in index order), or `error` when the engine refused this prompt."""

    prompt_tokens: int
    texts: list[str]
    finish_reasons: list[str | None]
    completion_tokens: list[int]
    logprobs: list[list[TokenLogprob] | None]
    error: str | None = None


@dataclass(frozen=True)
class RunResult:
    version: str
    results: list[PromptResult]

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.results)

    @property
    def completion_tokens(self) -> int:
        return sum(sum(r.completion_tokens) for r in self.results)


class GenerationService:
    def __init__(
        self,
        engine: VllmEngine,
        gate: SwapGate,
        metrics: GeneratorMetrics,
        limits: Limits,
    ) -> None:
        self.engine = engine
        self.gate = gate
        self.metrics = metrics
        self.limits = limits

    # --- request checks -----------------------------------------------------------------------

    def check_prompt_count(self, count: int, *, param: str) -> None:
        if count > self.limits.max_batch_prompts:
            raise ValidationError(
                f"{count} prompts in one request; this server takes at most "
                f"{self.limits.max_batch_prompts}: split the request",
                param=param,
            )

    def check_fields(self, fields: SamplingFields) -> None:
        """Request-wide caps (n, max_tokens): a ValidationError naming the field to fix."""
        lim = self.limits
        if fields.n > lim.max_n:
            raise ValidationError(
                f"n={fields.n} is above this server's limit of {lim.max_n} samples per prompt",
                param="n",
            )
        if fields.max_tokens is not None and fields.max_tokens > lim.max_tokens_limit:
            raise ValidationError(
                f"max_tokens={fields.max_tokens} is above this server's limit of "
                f"{lim.max_tokens_limit}",
                param="max_tokens",
            )

    def spec_for(
        self,
        fields: SamplingFields,
        prompt_len: int,
        *,
        index: int,
        prompt_param: str,
        logprobs: int | None = None,
    ) -> SamplingSpec:
        """The spec of prompt `index`, or a ValidationError saying which limit it breaks."""
        lim = self.limits
        room = lim.max_model_len - prompt_len
        if room < 1:
            raise ValidationError(
                f"prompt {index} has {prompt_len} tokens, which fills the model's context of "
                f"{lim.max_model_len} tokens: shorten it",
                param=prompt_param,
            )
        if fields.max_tokens is None:
            max_tokens = min(lim.default_max_tokens, room)
        elif fields.max_tokens > room:
            raise ValidationError(
                f"prompt {index} has {prompt_len} tokens and max_tokens is {fields.max_tokens}: "
                f"together more than the model's context of {lim.max_model_len} tokens; "
                "lower max_tokens or shorten the prompt",
                param="max_tokens",
            )
        else:
            max_tokens = fields.max_tokens
        if fields.min_tokens > max_tokens:
            raise ValidationError(
                f"min_tokens={fields.min_tokens} is above max_tokens={max_tokens}",
                param="min_tokens",
            )
        return SamplingSpec(
            n=fields.n,
            temperature=fields.temperature,
            top_p=fields.top_p,
            max_tokens=max_tokens,
            min_tokens=fields.min_tokens,
            seed=fields.seed,
            stop=tuple(fields.stop_list()),
            presence_penalty=fields.presence_penalty,
            frequency_penalty=fields.frequency_penalty,
            logprobs=logprobs,
        )

    def sampling_specs(
        self,
        fields: SamplingFields,
        prompt_lens: Sequence[int],
        *,
        prompt_param: str,
        logprobs: int | None = None,
    ) -> list[SamplingSpec]:
        """One spec per prompt, or a ValidationError naming the field to fix."""
        self.check_fields(fields)
        return [
            self.spec_for(fields, n, index=i, prompt_param=prompt_param, logprobs=logprobs)
            for i, n in enumerate(prompt_lens)
        ]

    # --- whole answers ------------------------------------------------------------------------

    async def run(
        self,
        prompts: Sequence[list[int]],
        specs: Sequence[SamplingSpec],
        *,
        route: str,
        isolate_errors: bool = False,
    ) -> RunResult:
        """Generate every prompt under one weight version; re-run all of it if a swap aborted it.

        With `isolate_errors`, a prompt the engine rejects (a ValidationError) gets a result with
        `error` set and the others run on; otherwise it fails the whole request.
        """
        base_id = f"{route}-{uuid.uuid4().hex}"
        attempt = 0
        while True:
            lease = await self.gate.acquire(restartable=True)
            try:
                steps = await self._run_leased(
                    lease, prompts, specs, f"{base_id}-{attempt}", isolate_errors=isolate_errors
                )
                aborted = any(step is None for step in steps)
                lease.requeued = aborted
            finally:
                self.gate.release(lease)
            if not aborted:
                break
            # A swap in abort mode stopped us; the gate now holds us until the new weights serve.
            self.metrics.requeued.inc()
            attempt += 1
            log.info("request %s stopped by a weight swap; running it again", base_id)
        results = []
        for prompt, step in zip(prompts, steps, strict=True):
            assert step is not None
            if isinstance(step, ValidationError):
                results.append(PromptResult(len(prompt), [], [], [], [], error=step.message))
                continue
            samples = sorted(step.samples, key=lambda s: s.index)
            results.append(
                PromptResult(
                    prompt_tokens=len(prompt),
                    texts=[s.text for s in samples],
                    finish_reasons=[s.finish_reason for s in samples],
                    completion_tokens=[s.num_tokens for s in samples],
                    logprobs=[s.logprobs for s in samples],
                )
            )
        result = RunResult(version=lease.version, results=results)
        self.metrics.prompt_tokens.inc(result.prompt_tokens)
        self.metrics.generation_tokens.inc(result.completion_tokens)
        return result

    async def _run_leased(
        self,
        lease: Lease,
        prompts: Sequence[list[int]],
        specs: Sequence[SamplingSpec],
        base_id: str,
        *,
        isolate_errors: bool,
    ) -> list[EngineStep | ValidationError | None]:
        async def one(i: int) -> EngineStep | ValidationError | None:
            if lease.abort_requested:
                return None
            request_id = f"{base_id}-{i}"
            lease.request_ids.add(request_id)
            final = None
            try:
                async for step in self.engine.generate(
                    prompts[i], specs[i], request_id, stream=False
                ):
                    final = step
            except ValidationError as exc:
                if not isolate_errors:
                    raise
                log.warning("prompt %d of request %s rejected: %s", i, base_id, exc.message)
                return exc
            if final is None or final.aborted:
                return None
            self._cross_check(lease, final.engine_versions)
            return final

        # A TaskGroup, not gather: if one prompt fails, the others are cancelled (and aborted in
        # the engine) instead of running on without a lease.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(i)) for i in range(len(prompts))]
        except BaseExceptionGroup as failed:
            # Callers (and the error handlers) expect the typed error, not a group of them.
            raise failed.exceptions[0] from failed
        return [t.result() for t in tasks]

    def _cross_check(self, lease: Lease, engine_versions: list[str]) -> None:
        if engine_versions and engine_versions != [lease.version]:
            # Would mean the gate failed; make it loud rather than mislabel silently.
            log.error(
                "version mismatch: gate says %s, vLLM recorded %s", lease.version, engine_versions
            )
            raise ServerError(
                f"weight version mismatch (gate {lease.version}, engine {engine_versions})"
            )

    # --- streams --------------------------------------------------------------------------------

    async def open_stream(self) -> Lease:
        """A non-restartable lease for a stream: a swap waits for the stream to end."""
        return await self.gate.acquire(restartable=False)

    async def stream_deltas(
        self,
        lease: Lease,
        prompts: Sequence[list[int]],
        specs: Sequence[SamplingSpec],
        *,
        route: str,
    ) -> AsyncGenerator[tuple[int, SampleDelta], None]:
        """(prompt index, delta) pairs as the engine produces them, prompts interleaved."""
        base_id = f"{route}-{uuid.uuid4().hex}"
        queue: asyncio.Queue[tuple[int, SampleDelta] | BaseException | None] = asyncio.Queue()

        async def pump(i: int) -> None:
            request_id = f"{base_id}-{i}"
            lease.request_ids.add(request_id)
            try:
                async for step in self.engine.generate(
                    prompts[i], specs[i], request_id, stream=True
                ):
                    for sample in step.samples:
                        await queue.put((i, sample))
                    if step.finished:
                        self._cross_check(lease, step.engine_versions)
            except Exception as exc:
                await queue.put(exc)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
        remaining = len(tasks)
        prompt_tokens = sum(len(p) for p in prompts)
        generated = 0
        try:
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    generated += item[1].num_tokens
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.metrics.prompt_tokens.inc(prompt_tokens)
            self.metrics.generation_tokens.inc(generated)

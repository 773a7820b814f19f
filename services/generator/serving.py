"""OpenAI-format serving: request bodies in, responses or SSE streams out (routes stay thin).

Chat prompts go through the model's chat template; completion prompts are tokenized as they are.
Both routes share one path (`_serve`): a `_Shape` says only what differs between them, the
models of a choice and of a chunk. Every response carries the weight version that produced it, in
the body (`weight_version`, also in every stream chunk) and in the `X-Model-Version` header.

Why the protocol is written here rather than vLLM's own OpenAI serving classes mounted over the
engine: every response must say which weight version made it, the swap gate must hold a lease
around every request (and re-run requests a swap aborted), and the batch route answers per item;
vLLM's serving layer knows none of these, and its classes change shape every release (they would
be a second vLLM surface beside `engine.py`). Logprobs cost one field mapping here.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from pairloop.contracts.generator import (
    VERSION_HEADER,
    BatchChatRequest,
    BatchChatResponse,
    BatchChatResult,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    TopLogprob,
    Usage,
)
from pairloop.errors import NotFoundError, ValidationError
from services.generator.deps import Runtime
from services.generator.engine_types import SamplingSpec, TokenLogprob
from services.generator.gate import Lease
from services.generator.streaming import LeasedStreamingResponse, sse_done, sse_event

__all__ = ["batch_chat", "chat_completion", "check_model", "completion"]


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise NotFoundError(
            f"model {requested!r} is not served here; this server serves {served!r}",
            param="model",
        )


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _json(body: BaseModel, version: str) -> JSONResponse:
    # model_dump + JSONResponse: skips FastAPI's second validation pass of the response model.
    return JSONResponse(body.model_dump(mode="json"), headers={VERSION_HEADER: version})


def _messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


# --- logprobs in OpenAI's two formats -------------------------------------------------------------


def _completion_logprobs(lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """Legacy format; `offset` is where this piece starts in the choice's text (streams)."""
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobs(
        tokens=[lp.token for lp in lps],
        token_logprobs=[lp.logprob for lp in lps],
        # OpenAI's completions format: the sampled token is always among a position's
        # alternatives (up to logprobs + 1 of them), also when sampling picked one outside the top.
        top_logprobs=[_top_by_text([(lp.token, lp.logprob), *lp.top]) for lp in lps],
        text_offset=offsets,
    )


def _top_by_text(top: list[tuple[str, float]]) -> dict[str, float]:
    """The legacy format keys alternatives by text; two token ids can decode to the same text
    (byte-level pieces of one character both read as U+FFFD), and then the first one stays (the
    sampled token, then the likelier one)."""
    out: dict[str, float] = {}
    for text, value in top:
        out.setdefault(text, value)
    return out


def _chat_logprobs(lps: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode()),
                top_logprobs=[
                    TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in lp.top
                ],
            )
            for lp in lps
        ]
    )


# --- what differs between /v1/completions and /v1/chat/completions --------------------------------

_Reason = Any  # a FinishReason literal, as vLLM reports it


@dataclass(frozen=True)
class _Shape:
    route: str
    id_prefix: str
    response: type[CompletionResponse] | type[ChatCompletionResponse]
    chunk: type[CompletionChunk] | type[ChatCompletionChunk]
    # (index, text, finish reason, logprobs or None, text offset) -> a choice / a chunk's choice
    choice: Callable[[int, str, _Reason, list[TokenLogprob] | None, int], BaseModel]
    chunk_choice: Callable[[int, str, _Reason, list[TokenLogprob] | None, int], BaseModel]
    # Chunks that open each choice of a stream before any text (chat: the role).
    opening: Callable[[int], BaseModel] | None = None


_COMPLETION = _Shape(
    route="completions",
    id_prefix="cmpl",
    response=CompletionResponse,
    chunk=CompletionChunk,
    choice=lambda i, text, reason, lps, off: CompletionChoice(
        index=i,
        text=text,
        finish_reason=reason,
        logprobs=None if lps is None else _completion_logprobs(lps, off),
    ),
    chunk_choice=lambda i, text, reason, lps, off: CompletionChunkChoice(
        index=i,
        text=text,
        finish_reason=reason,
        logprobs=None if lps is None else _completion_logprobs(lps, off),
    ),
)

_CHAT = _Shape(
    route="chat",
    id_prefix="chatcmpl",
    response=ChatCompletionResponse,
    chunk=ChatCompletionChunk,
    choice=lambda i, text, reason, lps, off: ChatCompletionChoice(
        index=i,
        message=ChatMessage(role="assistant", content=text),
        finish_reason=reason,
        logprobs=None if lps is None else _chat_logprobs(lps),
    ),
    chunk_choice=lambda i, text, reason, lps, off: ChatCompletionChunkChoice(
        index=i,
        delta=ChatDelta(content=text),
        finish_reason=reason,
        logprobs=None if lps is None else _chat_logprobs(lps),
    ),
    # OpenAI opens every choice with a role-only delta.
    opening=lambda j: ChatCompletionChunkChoice(
        index=j, delta=ChatDelta(role="assistant", content="")
    ),
)


async def _serve(
    runtime: Runtime,
    shape: _Shape,
    prompts: list[list[int]],
    specs: list[SamplingSpec],
    *,
    served: str,
    stream: bool,
    include_usage: bool,
) -> JSONResponse | LeasedStreamingResponse:
    gen = runtime.generation
    rid = f"{shape.id_prefix}-{uuid.uuid4().hex}"
    n = specs[0].n
    if stream:
        lease = await gen.open_stream()
        events = _events(runtime, shape, lease, prompts, specs, rid, served, include_usage)
        return LeasedStreamingResponse(
            events,
            release=lambda: runtime.gate.release(lease),
            headers={VERSION_HEADER: lease.version},
        )
    result = await gen.run(prompts, specs, route=shape.route)
    choices = [
        shape.choice(i * n + j, text, reason, lps, 0)
        for i, pr in enumerate(result.results)
        for j, (text, reason, lps) in enumerate(
            zip(pr.texts, pr.finish_reasons, pr.logprobs, strict=True)
        )
    ]
    response = shape.response(
        id=rid,
        model=served,
        choices=choices,
        usage=_usage(result.prompt_tokens, result.completion_tokens),
        weight_version=result.version,
    )
    return _json(response, result.version)


async def _events(
    runtime: Runtime,
    shape: _Shape,
    lease: Lease,
    prompts: list[list[int]],
    specs: list[SamplingSpec],
    rid: str,
    served: str,
    include_usage: bool,
) -> AsyncGenerator[str, None]:
    created = int(time.time())
    n = specs[0].n

    def chunk(choices: list[BaseModel], usage: Usage | None = None) -> str:
        return sse_event(
            shape.chunk(
                id=rid,
                created=created,
                model=served,
                choices=choices,
                usage=usage,
                weight_version=lease.version,
            )
        )

    if shape.opening is not None:
        for j in range(len(prompts) * n):
            yield chunk([shape.opening(j)])
    generated = 0
    offsets: dict[int, int] = {}
    deltas = runtime.generation.stream_deltas(lease, prompts, specs, route=shape.route)
    async with contextlib.aclosing(deltas):
        async for prompt_index, sample in deltas:
            generated += sample.num_tokens
            if not sample.text and sample.finish_reason is None and not sample.logprobs:
                continue
            index = prompt_index * n + sample.index
            offset = offsets.get(index, 0)
            offsets[index] = offset + len(sample.text)
            yield chunk(
                [
                    shape.chunk_choice(
                        index, sample.text, sample.finish_reason, sample.logprobs, offset
                    )
                ]
            )
    if include_usage:
        yield chunk([], _usage(sum(len(p) for p in prompts), generated))
    yield sse_done()


# --- /v1/completions, /v1/chat/completions --------------------------------------------------------


async def completion(
    runtime: Runtime, body: CompletionRequest, served: str
) -> JSONResponse | LeasedStreamingResponse:
    check_model(body.model, served)
    gen = runtime.generation
    texts = body.prompts()
    gen.check_prompt_count(len(texts), param="prompt")
    prompts = [runtime.engine.encode_prompt(t) for t in texts]
    specs = gen.sampling_specs(
        body, [len(p) for p in prompts], prompt_param="prompt", logprobs=body.logprobs
    )
    return await _serve(
        runtime,
        _COMPLETION,
        prompts,
        specs,
        served=served,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


async def chat_completion(
    runtime: Runtime, body: ChatCompletionRequest, served: str
) -> JSONResponse | LeasedStreamingResponse:
    check_model(body.model, served)
    gen = runtime.generation
    prompt = runtime.engine.render_chat(_messages(body.messages))
    specs = gen.sampling_specs(
        body, [len(prompt)], prompt_param="messages", logprobs=body.logprobs_k()
    )
    return await _serve(
        runtime,
        _CHAT,
        [prompt],
        specs,
        served=served,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


# --- /v1/batch/chat -------------------------------------------------------------------------------


def _name(cid: str, conversation: Sequence[ChatMessage]) -> str:
    """How an error names a conversation: its id and the first characters of its last turn."""
    text = " ".join(conversation[-1].content.split())
    return f"{cid!r} ({text[:40] + '...' if len(text) > 40 else text!r})"


async def batch_chat(runtime: Runtime, body: BatchChatRequest, served: str) -> JSONResponse:
    """Every conversation answered, or given an error entry; request-wide problems stay a 400."""
    gen = runtime.generation
    gen.check_prompt_count(len(body.conversations), param="conversations")
    gen.check_fields(body)
    ids = body.ids or [str(i) for i in range(len(body.conversations))]
    errors: dict[int, str] = {}
    prompts: list[list[int]] = []
    specs: list[SamplingSpec] = []
    runnable: list[int] = []
    for i, conv in enumerate(body.conversations):
        try:
            prompt = runtime.engine.render_chat(_messages(conv))
            spec = gen.spec_for(body, len(prompt), index=i, prompt_param="conversations")
        except ValidationError as exc:
            errors[i] = f"conversation {_name(ids[i], conv)}: {exc.message}"
            continue
        prompts.append(prompt)
        specs.append(spec)
        runnable.append(i)
    if runnable:
        result = await gen.run(prompts, specs, route="batch", isolate_errors=True)
        version, answered = result.version, dict(zip(runnable, result.results, strict=True))
    else:  # nothing to run: no lease was taken, the serving version is still the truth
        version, answered = runtime.gate.version, {}
    results = []
    for i, cid in enumerate(ids):
        pr = answered.get(i)
        if pr is None or pr.error is not None:
            reason = pr.error if pr else "not run"
            message = errors.get(i) or f"conversation {_name(cid, body.conversations[i])}: {reason}"
            results.append(BatchChatResult(id=cid, error=message))
            continue
        results.append(
            BatchChatResult(
                id=cid,
                outputs=pr.texts,
                finish_reasons=pr.finish_reasons,
                completion_tokens=pr.completion_tokens,
                prompt_tokens=pr.prompt_tokens,
            )
        )
    failed = sum(1 for r in results if r.error)
    if failed:
        gen.metrics.batch_item_errors.inc(failed)
    return _json(BatchChatResponse(model=served, weight_version=version, results=results), version)

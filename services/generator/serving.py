"""OpenAI-format serving: request bodies in, responses or SSE streams out (routes stay thin).

Chat prompts go through the model's chat template; completion prompts are tokenized as they are.
Every response carries the weight version that produced it, in the body (`weight_version`, also
in every stream chunk) and in the `X-Model-Version` header.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Sequence

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
    ChatMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from pairloop.errors import NotFoundError
from services.generator.deps import Runtime
from services.generator.gate import Lease
from services.generator.sampling import SamplingSpec
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


def _leased_stream(
    runtime: Runtime, events: AsyncGenerator[str, None], lease: Lease
) -> LeasedStreamingResponse:
    return LeasedStreamingResponse(
        events,
        release=lambda: runtime.gate.release(lease),
        headers={VERSION_HEADER: lease.version},
    )


# --- /v1/completions ------------------------------------------------------------------------------


async def completion(
    runtime: Runtime, body: CompletionRequest, served: str
) -> JSONResponse | LeasedStreamingResponse:
    check_model(body.model, served)
    gen = runtime.generation
    texts = body.prompts()
    gen.check_prompt_count(len(texts), param="prompt")
    prompts = [runtime.engine.encode_prompt(t) for t in texts]
    specs = gen.sampling_specs(body, [len(p) for p in prompts], prompt_param="prompt")
    rid = f"cmpl-{uuid.uuid4().hex}"
    if body.stream:
        lease = await gen.open_stream()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _completion_events(runtime, lease, prompts, specs, rid, served, include_usage)
        return _leased_stream(runtime, events, lease)
    result = await gen.run(prompts, specs, route="completions")
    choices = [
        CompletionChoice(index=i * body.n + j, text=text, finish_reason=reason)
        for i, pr in enumerate(result.results)
        for j, (text, reason) in enumerate(zip(pr.texts, pr.finish_reasons, strict=True))
    ]
    response = CompletionResponse(
        id=rid,
        model=served,
        choices=choices,
        usage=_usage(result.prompt_tokens, result.completion_tokens),
        weight_version=result.version,
    )
    return _json(response, result.version)


async def _completion_events(
    runtime: Runtime,
    lease: Lease,
    prompts: list[list[int]],
    specs: list[SamplingSpec],
    rid: str,
    served: str,
    include_usage: bool,
) -> AsyncGenerator[str, None]:
    created = int(time.time())
    n = specs[0].n
    generated = 0
    deltas = runtime.generation.stream_deltas(lease, prompts, specs, route="completions")
    async with contextlib.aclosing(deltas):
        async for prompt_index, sample in deltas:
            generated += sample.num_tokens
            if not sample.text and sample.finish_reason is None:
                continue
            choice = CompletionChunkChoice(
                index=prompt_index * n + sample.index,
                text=sample.text,
                finish_reason=sample.finish_reason,
            )
            yield sse_event(
                CompletionChunk(
                    id=rid,
                    created=created,
                    model=served,
                    choices=[choice],
                    weight_version=lease.version,
                )
            )
    if include_usage:
        usage = _usage(sum(len(p) for p in prompts), generated)
        yield sse_event(
            CompletionChunk(
                id=rid,
                created=created,
                model=served,
                choices=[],
                usage=usage,
                weight_version=lease.version,
            )
        )
    yield sse_done()


# --- /v1/chat/completions -------------------------------------------------------------------------


async def chat_completion(
    runtime: Runtime, body: ChatCompletionRequest, served: str
) -> JSONResponse | LeasedStreamingResponse:
    check_model(body.model, served)
    gen = runtime.generation
    prompt = runtime.engine.render_chat(_messages(body.messages))
    specs = gen.sampling_specs(body, [len(prompt)], prompt_param="messages")
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        lease = await gen.open_stream()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _chat_events(runtime, lease, prompt, specs[0], rid, served, include_usage)
        return _leased_stream(runtime, events, lease)
    result = await gen.run([prompt], specs, route="chat")
    pr = result.results[0]
    choices = [
        ChatCompletionChoice(
            index=j,
            message=ChatMessage(role="assistant", content=text),
            finish_reason=reason,
        )
        for j, (text, reason) in enumerate(zip(pr.texts, pr.finish_reasons, strict=True))
    ]
    response = ChatCompletionResponse(
        id=rid,
        model=served,
        choices=choices,
        usage=_usage(result.prompt_tokens, result.completion_tokens),
        weight_version=result.version,
    )
    return _json(response, result.version)


async def _chat_events(
    runtime: Runtime,
    lease: Lease,
    prompt: list[int],
    spec: SamplingSpec,
    rid: str,
    served: str,
    include_usage: bool,
) -> AsyncGenerator[str, None]:
    created = int(time.time())

    def chunk(choices: list[ChatCompletionChunkChoice], usage: Usage | None = None) -> str:
        return sse_event(
            ChatCompletionChunk(
                id=rid,
                created=created,
                model=served,
                choices=choices,
                usage=usage,
                weight_version=lease.version,
            )
        )

    # OpenAI opens every choice with a role-only delta.
    for j in range(spec.n):
        yield chunk(
            [ChatCompletionChunkChoice(index=j, delta=ChatDelta(role="assistant", content=""))]
        )
    generated = 0
    deltas = runtime.generation.stream_deltas(lease, [prompt], [spec], route="chat")
    async with contextlib.aclosing(deltas):
        async for _, sample in deltas:
            generated += sample.num_tokens
            if not sample.text and sample.finish_reason is None:
                continue
            yield chunk(
                [
                    ChatCompletionChunkChoice(
                        index=sample.index,
                        delta=ChatDelta(content=sample.text),
                        finish_reason=sample.finish_reason,
                    )
                ]
            )
    if include_usage:
        yield chunk([], _usage(len(prompt), generated))
    yield sse_done()


# --- /v1/batch/chat -------------------------------------------------------------------------------


async def batch_chat(runtime: Runtime, body: BatchChatRequest, served: str) -> JSONResponse:
    gen = runtime.generation
    gen.check_prompt_count(len(body.conversations), param="conversations")
    prompts = [runtime.engine.render_chat(_messages(conv)) for conv in body.conversations]
    specs = gen.sampling_specs(body, [len(p) for p in prompts], prompt_param="conversations")
    result = await gen.run(prompts, specs, route="batch")
    ids = body.ids or [str(i) for i in range(len(prompts))]
    response = BatchChatResponse(
        model=served,
        weight_version=result.version,
        results=[
            BatchChatResult(
                id=cid,
                outputs=pr.texts,
                finish_reasons=pr.finish_reasons,
                completion_tokens=pr.completion_tokens,
                prompt_tokens=pr.prompt_tokens,
            )
            for cid, pr in zip(ids, result.results, strict=True)
        ],
    )
    return _json(response, result.version)

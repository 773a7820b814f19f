"""HTTP contract of the generator service, shared by the server and its clients.

OpenAI-compatible completions and chat completions (the official `openai` client works against
them), plus a batch route for the orchestrator and the admin weight-swap route. Every response says
which weight version produced it: a `weight_version` field here and an `X-Model-Version` header.
Caps that depend on deployment (largest `n`, longest `max_tokens`) are enforced by the server from
its settings; what is invalid everywhere is rejected here.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "VERSION_HEADER",
    "BatchChatRequest",
    "BatchChatResponse",
    "BatchChatResult",
    "ChatCompletionChoice",
    "ChatCompletionChunk",
    "ChatCompletionChunkChoice",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatDelta",
    "ChatMessage",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionChunkChoice",
    "CompletionRequest",
    "CompletionResponse",
    "ModelCard",
    "ModelList",
    "SamplingFields",
    "StreamOptions",
    "Usage",
    "WeightSwapRequest",
    "WeightSwapResponse",
]

VERSION_HEADER = "X-Model-Version"

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "abort"] | None


class ChatMessage(BaseModel):
    """One chat turn; `content` is plain text."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str


class SamplingFields(BaseModel):
    """Sampling knobs common to every generation route (OpenAI names and defaults)."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, ge=1, description="samples per prompt; the server caps it (max_n)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(
        None, ge=1, description="new tokens per sample; default: the server's default_max_tokens"
    )
    min_tokens: int = Field(
        0,
        ge=0,
        description="vLLM extension: EOS and stop strings are ignored until this many tokens "
        "(min_tokens = max_tokens gives fixed-length samples, as benchmarks want)",
    )
    seed: int | None = Field(None, description="per-request seed: same seed, same samples")
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        if len(items) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    @model_validator(mode="after")
    def _min_below_max(self) -> SamplingFields:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`: `include_usage` adds a last chunk with the token counts."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`: raw prompt(s), no chat template."""

    model: str | None = None
    prompt: str | list[str] = Field(description="a prompt, or a list of prompts")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("prompt list must not be empty")
        if any(not p for p in prompts):
            raise ValueError("prompts must not be empty strings")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`: the model's chat template is applied to `messages`."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _merge_max_tokens(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    weight_version: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: FinishReason = None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    weight_version: str


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason = None
    logprobs: None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (`data: {...}`); the stream ends `[DONE]`."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
    weight_version: str


class ChatDelta(BaseModel):
    """What a chat chunk adds: the role once (first chunk of a choice), then content."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion; every chunk carries the version."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None
    weight_version: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pairloop"
    root: str | None = None
    weight_version: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class BatchChatRequest(SamplingFields):
    """`POST /v1/batch/chat`: many conversations x `n` samples in one call (the orchestrator's path).

    All of a batch is generated under one weight version: a swap waits for the batch to finish.
    """

    conversations: list[list[ChatMessage]] = Field(min_length=1)
    ids: list[str] | None = Field(None, description="caller's ids, echoed back; default 0..N-1")

    @model_validator(mode="after")
    def _check(self) -> BatchChatRequest:
        if any(not conv for conv in self.conversations):
            raise ValueError("every conversation needs at least one message")
        if self.ids is not None and len(self.ids) != len(self.conversations):
            raise ValueError("ids must have one entry per conversation")
        return self


class BatchChatResult(BaseModel):
    id: str
    outputs: list[str]
    finish_reasons: list[FinishReason]
    completion_tokens: list[int]
    prompt_tokens: int


class BatchChatResponse(BaseModel):
    model: str
    weight_version: str
    results: list[BatchChatResult]


class WeightSwapRequest(BaseModel):
    """`POST /admin/weights`: load the checkpoint at `path` (inside the model store) as `version`."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1, description="checkpoint dir, absolute or relative to the store root"
    )
    version: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$",
        description="label for the new weights, reported with every response",
    )
    mode: Literal["wait", "abort"] | None = Field(
        None,
        description="in-flight requests: 'wait' lets them finish on the old weights; 'abort' stops "
        "them and re-runs them on the new weights. Default: the server's swap_mode.",
    )


class WeightSwapResponse(BaseModel):
    version: str
    previous_version: str
    path: str
    seconds: float = Field(description="wall time of the whole swap, validation included")
    paused_seconds: float = Field(description="time new requests were held back")
    requeued_requests: int = 0

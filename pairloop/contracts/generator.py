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
    "ChatLogprobs",
    "ChatMessage",
    "ChatTokenLogprob",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionChunkChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "EngineState",
    "ModelCard",
    "ModelList",
    "ReleaseRequest",
    "ReleaseResponse",
    "SamplingFields",
    "StreamOptions",
    "TopLogprob",
    "Usage",
    "WakeRequest",
    "WakeResponse",
    "WeightSwapRequest",
    "WeightSwapResponse",
]

VERSION_HEADER = "X-Model-Version"

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "abort"] | None
# serving: answers requests; releasing / released / waking: the engine's accelerator memory is
# being given back, is free (time-shared placement: the trainer has the GPUs), or is being taken
# again; requests get 503 with Retry-After meanwhile, never a wrong answer.
EngineState = Literal["serving", "releasing", "released", "waking"]


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
    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="log-probability of each sampled token plus this many most likely "
        "alternatives per position (OpenAI: up to 5; this server: up to 20)",
    )
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
    logprobs: bool = Field(False, description="return the log-probability of each output token")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="most likely alternatives per position (needs logprobs)"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _merge_max_tokens(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprobs_k(self) -> int | None:
        """Alternatives per position the engine must return (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(BaseModel):
    """One output token of a chat choice, with its `top_logprobs` alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason = None
    logprobs: CompletionLogprobs | None = None


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
    logprobs: ChatLogprobs | None = None


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
    logprobs: CompletionLogprobs | None = None


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
    logprobs: ChatLogprobs | None = None


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
    dtype: str | None = Field(None, description="dtype the weights are served in")
    max_model_len: int | None = Field(None, description="context length (prompt + completion)")
    state: EngineState = Field(
        "serving", description="serving, or released (POST /admin/wake brings it back)"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class BatchChatRequest(SamplingFields):
    """`POST /v1/batch/chat`: many conversations x `n` samples in one call (the orchestrator's path).

    All of a batch is generated under one weight version: a swap waits for the batch to finish.
    A conversation that cannot be answered (too long for the context, rejected by the chat
    template or by the engine) gets a result with `error` set; the others are answered.
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
    """One conversation's answers, or `error` saying why it got none (the rest of the batch is
    answered all the same: one over-long prompt never fails its neighbours)."""

    id: str
    outputs: list[str] = Field(default_factory=list)
    finish_reasons: list[FinishReason] = Field(default_factory=list)
    completion_tokens: list[int] = Field(default_factory=list)
    prompt_tokens: int = 0
    error: str | None = None


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


class ReleaseRequest(BaseModel):
    """`POST /admin/release`: give the engine's accelerator memory back until `/admin/wake`."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["wait", "abort"] | None = Field(
        None,
        description="in-flight requests: 'wait' lets them finish first; 'abort' stops them (their "
        "callers get 503 and retry after the wake). Default: the server's swap_mode.",
    )


class ReleaseResponse(BaseModel):
    state: EngineState
    version: str = Field(description="the weight version that was serving (and is released)")
    how: Literal["sleep", "shutdown"] = Field(
        description="sleep: vLLM's sleep mode level 2 (GPU); shutdown: the engine's processes "
        "ended (CPU, or where sleep mode is unavailable)"
    )
    seconds: float
    already_released: bool = Field(False, description="true: it was released before this call")


class WakeRequest(WeightSwapRequest):
    """`POST /admin/wake`: bring a released engine back straight onto the checkpoint at `path`
    (the wake is the swap: same validation, version label and rollback). On a serving engine it
    is a weight swap (a no-op when `version` already serves from `path`), so it is idempotent."""


class WakeResponse(WeightSwapResponse):
    woke: bool = Field(description="true: the engine was released and woke; false: it was serving")

"""Engine-neutral types between the HTTP layer and the vLLM adapter (no vLLM import here).

`SamplingSpec` is what a request asks the engine for; `SampleDelta` / `EngineStep` are what comes
back (with `TokenLogprob`s when asked). Keeping these plain dataclasses lets the routes, the gate
and the swap logic be read (and imported) without vLLM, whose API moves every release. How the
engine itself is built comes straight from `GeneratorSettings` (see `engine.engine_args`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EngineStep", "ReloadError", "SampleDelta", "SamplingSpec", "TokenLogprob"]


class ReloadError(RuntimeError):
    """The engine refused to load a checkpoint in place; its model may be half-loaded."""


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling of one prompt: OpenAI's knobs plus vLLM's `min_tokens`.

    `logprobs`: None for none; k >= 0 for the sampled token's log-probability plus the k most
    likely alternatives at every step (OpenAI's completions `logprobs`, chat `top_logprobs`).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, log-probability, and the top alternatives (text, logprob),
    most likely first. Log-probabilities are the model's raw log-softmax (before temperature)."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class SampleDelta:
    """New text of sample `index` since the last step (the whole text when not streaming)."""

    index: int
    text: str
    num_tokens: int
    finish_reason: str | None = None
    # One entry per new token, when the request asked for logprobs.
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class EngineStep:
    """One output of the engine for one prompt: the samples that moved, and whether it is done."""

    samples: list[SampleDelta]
    finished: bool
    # Weight versions vLLM itself recorded for the tokens of this request (final step only); the
    # service's gate is the authority, this is a cross-check.
    engine_versions: list[str] = field(default_factory=list)

    @property
    def aborted(self) -> bool:
        return any(s.finish_reason == "abort" for s in self.samples)

"""Engine-neutral types between the HTTP layer and the vLLM adapter (no vLLM import here).

`SamplingSpec` is what a request asks the engine for; `SampleDelta` / `EngineStep` are what comes
back. Keeping these plain dataclasses lets the routes, the gate and the swap logic be read (and
imported) without vLLM, whose API moves every release.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EngineConfig", "EngineStep", "ReloadError", "SampleDelta", "SamplingSpec"]


class ReloadError(RuntimeError):
    """The engine refused to load a checkpoint in place; its model may be half-loaded."""


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling of one prompt: OpenAI's knobs plus vLLM's `min_tokens`."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class SampleDelta:
    """New text of sample `index` since the last step (the whole text when not streaming)."""

    index: int
    text: str
    num_tokens: int
    finish_reason: str | None = None


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


@dataclass(frozen=True)
class EngineConfig:
    """How to build the engine; filled from `GeneratorSettings` (see there for meanings)."""

    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    kv_cache_bytes: int = 2 << 30
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = True
    prefix_caching: bool = True
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    cpu_threads: int = 0
    seed: int = 0
    log_stats: bool = False
    initial_version: str = "base"

"""The records one stage hands the next, as they lie in the shard files.

    generate -> `GenerationRecord` per prompt (iter{k}/generations/, eval/policy{k}/shards/)
    rank     -> `RankedRecord` per prompt     (iter{k}/rankings/)
    best-of  -> `BestOfPick` per prompt       (eval/policy{k}/best_of_{n}/picks/)
    pairs    -> preference rows (`pairloop.preference_data`, the published dataset format)

A shard line is `json.dumps(record.model_dump(mode="json"), sort_keys=True)`: the bytes the stages
wrote before these models existed, so run directories made then resume unchanged. Every line is
validated when read (`ShardStore.read`); a line that does not fit fails with its file and line.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pairloop.contracts.generator import FinishReason

__all__ = ["BestOfPick", "GenerationRecord", "RankedRecord"]


class GenerationRecord(BaseModel):
    """One prompt's `n` answers from the generator, and the weight version that wrote them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_id: str
    prompt: str
    responses: list[str]
    finish_reasons: list[FinishReason]
    completion_tokens: list[int]
    weight_version: str
    # Set when the generator answered this prompt with an error entry (no responses); left out of
    # the line when None, so shards without errors keep their bytes.
    error: str | None = Field(None, exclude_if=lambda v: v is None)


class RankedRecord(BaseModel):
    """One prompt's non-empty answers with the ranker's verdict.

    `scores`/`ranks` are None in bubble mode (the ranker then knows only best and worst) and for a
    prompt left with fewer than two non-empty answers, which is not sent to the ranker at all.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_id: str
    prompt: str
    candidates: list[str] = Field(description="the non-empty responses, in generation order")
    empty: int = Field(0, ge=0, description="responses dropped because they were empty")
    scores: list[float] | None = None
    ranks: list[int] | None = None
    # Each answer's probability of beating the others (the ranker's full mode); left out of the
    # line when None, so shards written before it existed keep their bytes.
    win_probs: list[float] | None = Field(None, exclude_if=lambda v: v is None)
    best_index: int = 0
    worst_index: int = 0
    truncated: bool = Field(False, description="the ranker cut the prompt or an answer")
    error: str | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="the generator's error for this prompt (it has no answers)",
    )


class BestOfPick(BaseModel):
    """The ranker's pick among one prompt's best-of-n samples (evaluation)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_id: str
    prompt: str
    output: str = Field(description="the picked sample (empty only when every sample was)")
    index: int = Field(ge=0, description="its position among the samples")
    score: float | None = Field(None, description="the ranker's score for it; None: not ranked")
    samples: int = Field(ge=0, description="how many samples were drawn")

"""Prompt admission at run creation: every prompt a run uses fits the models, or is not used.

    slices, report = admit_prompts(pool, cfg)      # called by orchestrator.runs.create_run

A prompt is measured as the generator will see it: the policy's tokenizer over its chat template
(one user turn, assistant turn opened), exactly `VllmEngine.render_chat`. It fits when its tokens
plus the most new tokens any stage asks for (sampling.max_tokens, evaluation.max_tokens) fit the
generator's context: the base model's `max_position_embeddings`, capped by `sampling.max_model_len`
when the generator runs with a smaller `--max-model-len`. With `prompts.enforce_max_prompt_length`
the trainer's `dpo.max_prompt_length` is a limit too (by default the trainer truncates longer
prompts itself, as TRL's `max_prompt_length` did; they are counted).

Prompts that do not fit are skipped (`prompts.too_long: skip`, default) or cut to fit
(`truncate`). Slices are drawn in the seeded order of the whole pool, so a skipped prompt's place
goes to the next prompt of that order: every slice keeps its size. Only as many prompts as the run
needs are measured (in chunks): a run of a few hundred prompts does not tokenize a whole pool.
When the pool runs out, the error says how many were found, how many were needed, why the others
were refused (with examples: id, first characters, tokens, limit) and what to change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.config import ConfigError, RunConfig
from orchestrator.prompts import (
    PromptPool,
    PromptRecord,
    cut_slices,
    describe_not_string,
    needed,
    shuffled,
)
from pairloop.model_config import model_context_length
from pairloop.truncation import keep_end

__all__ = [
    "AdmissionReport",
    "EvalAdmission",
    "PromptLimit",
    "PromptMeter",
    "TokenizerMeter",
    "admission_summary",
    "admit_eval_prompts",
    "admit_prompts",
    "describe_prompt",
    "generator_context",
    "prompt_limit",
]

# Prompts measured per tokenizer call: large enough to amortise the call, small enough that a run
# needing a few hundred prompts does not tokenize a whole 60k pool.
_CHUNK = 512
# Skipped prompts quoted in the manifest and in errors.
_EXAMPLES = 5


class PromptMeter(Protocol):
    """Counts a prompt's tokens as the generator renders it, and cuts one to a token budget."""

    def count(self, prompts: Sequence[str]) -> list[int]: ...

    def truncate(self, prompt: str, max_tokens: int) -> str: ...


class TokenizerMeter:
    """`PromptMeter` over a Hugging Face tokenizer and its chat template (the policy's own)."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "base_model: its tokenizer has no chat template, and the generator renders every "
                "prompt through it; use a chat model (or add a chat_template)"
            )
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, model: str) -> TokenizerMeter:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"base_model: cannot load its tokenizer from {model}: {exc}"
            ) from None
        return cls(tokenizer)

    def _render(self, prompt: str) -> str:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return str(text)

    def count(self, prompts: Sequence[str]) -> list[int]:
        # The template writes the special tokens itself (BOS, turn markers), as in the generator.
        # verbose=False: measuring prompts longer than the model is the point, not a mistake.
        ids = self.tokenizer(
            [self._render(p) for p in prompts], add_special_tokens=False, verbose=False
        )
        return [len(x) for x in ids["input_ids"]]

    def truncate(self, prompt: str, max_tokens: int) -> str:
        """The longest end of `prompt` whose rendering has at most `max_tokens` tokens.

        The end, as the trainer keeps it (`pairloop.truncation.keep_end`): a long UltraFeedback
        prompt puts its question last, after the material it is about.
        """
        content = self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        overhead = self.count([""])[0]
        keep = max(0, max_tokens - overhead)
        for _ in range(8):  # re-tokenizing a cut can merge differently: shrink until it fits
            kept = keep_end(content, keep)
            text = str(self.tokenizer.decode(kept, skip_special_tokens=True))
            excess = self.count([text])[0] - max_tokens
            if excess <= 0:
                return text
            keep = max(0, keep - excess)
        return ""


@dataclass(frozen=True)
class PromptLimit:
    """The most tokens a rendered prompt may have, and the limit that sets it, in words."""

    tokens: int
    reason: str


def generator_context(cfg: RunConfig) -> tuple[int, str]:
    """The generator context (prompt + new tokens) the run assumes, and where it comes from."""
    native = model_context_length(cfg.base_model)
    cap = cfg.sampling.max_model_len
    if native is None and cap is None:
        raise ConfigError(
            "sampling.max_model_len: the base model's config gives no context length "
            "(max_position_embeddings); set the generator's --max-model-len here too"
        )
    context = min(x for x in (native, cap) if x is not None)
    where = "sampling.max_model_len" if cap is not None and context == cap else "the base model's"
    return context, where


def prompt_limit(cfg: RunConfig) -> PromptLimit:
    """The tightest of the generator's room for a prompt and (optionally) the trainer's limit."""
    context, where = generator_context(cfg)
    new_tokens, field_name = cfg.sampling.max_tokens, "sampling.max_tokens"
    if cfg.evaluation.enabled and cfg.evaluation.max_tokens > new_tokens:
        new_tokens, field_name = cfg.evaluation.max_tokens, "evaluation.max_tokens"
    room = context - new_tokens
    if room < 1:
        raise ConfigError(
            f"{field_name}: {new_tokens} new tokens leave no room for a prompt in the generator's "
            f"context of {context} tokens ({where}); lower {field_name}"
        )
    limit = PromptLimit(
        room,
        f"the generator's context of {context} tokens ({where}) minus {new_tokens} new tokens "
        f"({field_name})",
    )
    trainer = cfg.dpo.max_prompt_length
    if cfg.prompts.enforce_max_prompt_length and trainer < limit.tokens:
        limit = PromptLimit(trainer, f"dpo.max_prompt_length of {trainer} tokens")
    return limit


def describe_prompt(record: PromptRecord, width: int = 60) -> str:
    """`'id' ("first characters...")`, how errors and logs name a prompt."""
    text = " ".join(record["prompt"].split())
    start = text if len(text) <= width else text[: width - 3] + "..."
    return f"{record['prompt_id']!r} ({start!r})"


@dataclass
class AdmissionReport:
    """What admission did; `metrics()` goes into the manifest's setup stage."""

    limit: PromptLimit
    policy: str
    pool: PromptPool
    needed: int
    examined: int = 0
    admitted: int = 0
    too_long: int = 0
    too_long_skipped: int = 0
    truncated: int = 0
    over_max_prompt_length: int = 0
    longest_admitted: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        return {
            "pool_rows": self.pool.rows,
            "pool_distinct": len(self.pool.records),
            "empty_skipped": self.pool.empty,
            "not_string_skipped": dict(self.pool.not_string),
            "duplicates_dropped": self.pool.duplicates,
            "examined": self.examined,
            "admitted": self.admitted,
            "too_long": self.too_long,
            "too_long_skipped": self.too_long_skipped,
            "too_long_truncated": self.truncated,
            "over_max_prompt_length": self.over_max_prompt_length,
            "prompt_token_limit": self.limit.tokens,
            "prompt_token_limit_reason": self.limit.reason,
            "longest_admitted_tokens": self.longest_admitted,
            "too_long_policy": self.policy,
            "skipped_examples": self.skipped[:_EXAMPLES],
        }


def _shortage(report: AdmissionReport, cfg: RunConfig) -> ConfigError:
    p = cfg.prompts
    refused = []
    if report.pool.not_string:
        refused.append(describe_not_string(report.pool.not_string))
    if report.pool.empty:
        refused.append(f"{report.pool.empty} empty or whitespace-only")
    if report.pool.duplicates:
        refused.append(f"{report.pool.duplicates} duplicates")
    if report.too_long_skipped:
        refused.append(f"{report.too_long_skipped} longer than {report.limit.tokens} tokens")
    examples = "".join(
        f"\n  skipped {e['prompt']}: {e['tokens']} tokens > {e['limit']}" for e in report.skipped
    )
    fixes = ["lower prompts.per_iteration or prompts.eval_prompts", "use a larger source"]
    if report.too_long_skipped and report.policy == "skip":
        fixes.insert(1, "set prompts.too_long: truncate")
        fixes.insert(2, "lower sampling.max_tokens / evaluation.max_tokens")
    return ConfigError(
        f"prompts: found {report.admitted} usable prompts in {cfg.prompts.source} "
        f"({report.pool.rows} rows; refused: {', '.join(refused) or 'none'}) but the run needs "
        f"{report.needed} ({p.eval_prompts} eval + {cfg.iterations} x {p.per_iteration}); "
        f"the limit is {report.limit.tokens} prompt tokens: {report.limit.reason}. "
        f"To fix: {'; or '.join(fixes)}.{examples}"
    )


def admit_prompts(
    pool: PromptPool,
    cfg: RunConfig,
    *,
    meter: PromptMeter | None = None,
    on_skip: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, list[PromptRecord]], AdmissionReport]:
    """The run's slices, every prompt in them fitting `prompt_limit(cfg)`, and the report.

    `meter` defaults to the base model's tokenizer; `on_skip` sees every refused prompt.
    """
    limit = prompt_limit(cfg)
    meter = meter or TokenizerMeter.from_pretrained(cfg.base_model)
    need = needed(cfg.prompts, cfg.iterations)
    report = AdmissionReport(limit=limit, policy=cfg.prompts.too_long, pool=pool, needed=need)
    order = shuffled(pool.records, cfg.prompts.seed)
    admitted: list[PromptRecord] = []
    start = 0
    while len(admitted) < need and start < len(order):
        chunk = order[start : start + max(_CHUNK, need - len(admitted))]
        start += len(chunk)
        for record, tokens in zip(chunk, meter.count([r["prompt"] for r in chunk]), strict=True):
            if len(admitted) == need:
                break
            kept = _admit_one(record, tokens, report, cfg, meter, on_skip)
            if kept is not None:
                admitted.append(kept)
    report.admitted = len(admitted)
    if len(admitted) < need:
        raise _shortage(report, cfg)
    return cut_slices(admitted, cfg.prompts, cfg.iterations), report


def _admit_one(
    record: PromptRecord,
    tokens: int,
    report: AdmissionReport,
    cfg: RunConfig,
    meter: PromptMeter,
    on_skip: Callable[[dict[str, Any]], None] | None,
) -> PromptRecord | None:
    """The one rule for every prompt a run uses: `record` as admitted (maybe cut), or None."""
    limit = report.limit
    report.examined += 1
    if tokens > limit.tokens:
        report.too_long += 1
        skipped = {
            "prompt_id": record["prompt_id"],
            "prompt": describe_prompt(record),
            "tokens": tokens,
            "limit": limit.tokens,
            "reason": limit.reason,
            "action": cfg.prompts.too_long,
        }
        if len(report.skipped) < _EXAMPLES:
            report.skipped.append(skipped)
        if on_skip is not None:
            on_skip(skipped)
        cut = ""
        if cfg.prompts.too_long == "truncate":
            cut = meter.truncate(record["prompt"], limit.tokens)
        if not cut.strip():  # skipped (or nothing of it fits: a skip after all)
            report.too_long_skipped += 1
            return None
        record = {**record, "prompt": cut}
        tokens = meter.count([cut])[0]
        report.truncated += 1
    if tokens > cfg.dpo.max_prompt_length:
        report.over_max_prompt_length += 1
    report.longest_admitted = max(report.longest_admitted, tokens)
    return record


@dataclass
class EvalAdmission:
    """The evaluation's own instructions after admission (none replaced: the set is fixed)."""

    prompts: list[PromptRecord]
    report: AdmissionReport

    def metrics(self) -> dict[str, Any]:
        r = self.report
        return {
            "instructions": r.examined,
            "admitted": r.admitted,
            "too_long_skipped": r.too_long_skipped,
            "too_long_truncated": r.truncated,
            "prompt_token_limit": r.limit.tokens,
            "skipped_examples": r.skipped[:_EXAMPLES],
        }


def admit_eval_prompts(
    instructions: list[PromptRecord],
    cfg: RunConfig,
    *,
    meter: PromptMeter | None = None,
    on_skip: Callable[[dict[str, Any]], None] | None = None,
) -> EvalAdmission:
    """The evaluation's instructions that fit, by the training prompts' rule (`_admit_one`).

    An instruction that cannot fit would fail at generation and score as a loss; it is left out
    (or cut, with `prompts.too_long: truncate`) and counted, never answered with nothing.
    """
    meter = meter or TokenizerMeter.from_pretrained(cfg.base_model)
    pool = PromptPool(records=instructions, rows=len(instructions))
    report = AdmissionReport(
        limit=prompt_limit(cfg), policy=cfg.prompts.too_long, pool=pool, needed=len(instructions)
    )
    admitted = []
    for start in range(0, len(instructions), _CHUNK):
        chunk = instructions[start : start + _CHUNK]
        for record, tokens in zip(chunk, meter.count([r["prompt"] for r in chunk]), strict=True):
            kept = _admit_one(record, tokens, report, cfg, meter, on_skip)
            if kept is not None:
                admitted.append(kept)
    report.admitted = len(admitted)
    if not admitted:
        raise ConfigError(
            f"evaluation.prompts: none of the {len(instructions)} instructions fits the limit of "
            f"{report.limit.tokens} prompt tokens ({report.limit.reason})"
        )
    return EvalAdmission(admitted, report)


def admission_summary(metrics: dict[str, Any]) -> str:
    """One line for `pairloop status` and the report, from the setup stage's `prompts` metrics."""
    m = metrics
    return (
        f"{m['admitted']} prompts admitted of {m['examined']} examined "
        f"({m['pool_distinct']} distinct in {m['pool_rows']} rows); skipped: "
        f"{m['too_long_skipped']} too long, {m['empty_skipped']} empty"
        + (
            f", {describe_not_string(m['not_string_skipped'])}"
            if m.get("not_string_skipped")
            else ""
        )
        + "; "
        f"{m['too_long_truncated']} truncated; {m['duplicates_dropped']} duplicates dropped; "
        f"limit {m['prompt_token_limit']} prompt tokens ({m['prompt_token_limit_reason']}); "
        f"{m['over_max_prompt_length']} above dpo.max_prompt_length (the trainer truncates them)"
    )

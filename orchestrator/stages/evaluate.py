"""Evaluation stage: policy k answers the evaluation instructions, and the judge compares.

Per policy k (0 = base), for every n in `evaluation.best_of`:
- n = 1: one answer per instruction (greedy by default), as AlpacaEval generates;
- n > 1: n samples, the run's ranker picks one (orchestrator/stages/best_of.py); a row judged by
  that same ranker is marked `self_judged` (the recipe names a separate judge).
Each is written in AlpacaEval's format (`eval/policy{k}[/best_of_{n}]/alpaca_eval_outputs.json`,
for AlpacaEval 2.0 proper), and judged against the base's plain answers (and, for n = 1, against
policy k-1's) by the judge: `evaluation.judge`, or the run's ranker. The judgments are written as
AlpacaEval annotations, and the figures include AlpacaEval's length-controlled win rate.
Instructions the generator could not answer are counted (`failed_prompts`), left out of the
outputs file and of every comparison; more than `sampling.max_failed_share` stops the stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.context import RunContext
from orchestrator.evaluation import alpaca_annotations, win_rate
from orchestrator.prompts import PromptRecord, read_prompts
from orchestrator.records import GenerationRecord
from orchestrator.shards import ShardStore, chunk
from orchestrator.stages.best_of import best_of_dir, generate_best_of
from orchestrator.stages.generate import check_failures, generate_shards
from orchestrator.stages.swap import ensure_version
from pairloop.atomic import atomic_write_json
from pairloop.contracts.ranker import CompareItem, CompareRequest

__all__ = ["eval_outputs", "evaluate_policy", "generate_eval_outputs", "run", "run_base"]


def _out_dir(ctx: RunContext, k: int) -> Path:
    return ctx.run_dir / "eval" / f"policy{k}"


def _prompts(ctx: RunContext) -> list[PromptRecord]:
    return read_prompts(ctx.run_dir / "prompts" / "eval.jsonl")


def eval_outputs(ctx: RunContext, k: int) -> list[dict[str, Any]]:
    """Policy k's plain answers, in instruction order: the instruction's record (`prompt_id`,
    `prompt`, `index`, `dataset`) plus `output`. Instructions the generator could not answer are
    left out (they are counted, never scored or published as empty answers)."""
    prompts = _prompts(ctx)
    store = ShardStore(_out_dir(ctx, k) / "shards", GenerationRecord)
    count = len(chunk(prompts, ctx.cfg.shard_size))
    by_id = {p["prompt_id"]: p for p in prompts}
    return [
        {**by_id[r.prompt_id], "output": r.responses[0]}
        for r in store.read_all(count)
        if r.error is None and r.responses
    ]


def _generator_name(ctx: RunContext, k: int, n: int) -> str:
    return ctx.version_label(k) if n == 1 else f"{ctx.version_label(k)}.best_of_{n}"


def _write_alpaca_outputs(path: Path, outputs: list[dict[str, Any]], generator: str) -> None:
    """AlpacaEval's model_outputs.json: the answered evaluation instructions, its fields."""
    rows = []
    for o in outputs:
        row = {"instruction": o["prompt"], "output": o["output"], "generator": generator}
        if "dataset" in o:
            row["dataset"] = o["dataset"]
        rows.append(row)
    atomic_write_json(path, rows)


async def generate_eval_outputs(ctx: RunContext, k: int) -> tuple[list[dict[str, Any]], int]:
    """Policy k's plain answers (generated where not done yet), and how many instructions the
    generator could not answer; writes its AlpacaEval file."""
    ev = ctx.cfg.evaluation
    prompts = _prompts(ctx)
    store = await generate_shards(
        ctx,
        prompts=prompts,
        out_dir=_out_dir(ctx, k) / "shards",
        policy=k,
        n=1,
        temperature=ev.temperature,
        max_tokens=ev.max_tokens,
        seed_key="eval",
        description=f"policy {k}: eval answers",
        stage=f"policy{k}.eval",
    )
    failed = check_failures(
        store,
        prompts,
        shard_size=ctx.cfg.shard_size,
        max_share=ctx.cfg.sampling.max_failed_share,
        stage=f"policy{k}.evaluate",
    )
    outputs = eval_outputs(ctx, k)
    _write_alpaca_outputs(
        _out_dir(ctx, k) / "alpaca_eval_outputs.json", outputs, _generator_name(ctx, k, 1)
    )
    return outputs, failed


async def _judge(
    ctx: RunContext, new: list[dict[str, Any]], ref: list[dict[str, Any]]
) -> tuple[list[float], int]:
    """P(new beats ref) per prompt, and how many comparisons the judge had to cut to its input
    limits (it saw less than the whole answer). Identical answers tie; an empty answer loses to a
    non-empty one."""
    truncated = 0
    probs: list[float | None] = []
    items: list[tuple[int, CompareItem]] = []
    for i, (a, b) in enumerate(zip(new, ref, strict=True)):
        x, y = a["output"], b["output"]
        if x == y or (not x.strip() and not y.strip()):
            probs.append(0.5)
        elif not x.strip():
            probs.append(0.0)
        elif not y.strip():
            probs.append(1.0)
        else:
            probs.append(None)
            items.append((i, CompareItem(prompt=a["prompt"], a=x, b=y)))
    for batch in chunk(items, ctx.cfg.ranker.batch_prompts):
        ctx.check_cancel()
        reply = await ctx.judge.compare(CompareRequest(items=[it for _, it in batch]))
        for (i, _), res in zip(batch, reply.results, strict=True):
            probs[i] = res.prob_a_beats_b
            truncated += res.truncated.any
    return [float(p) for p in probs if p is not None], truncated


async def _compare(
    ctx: RunContext,
    *,
    new: list[dict[str, Any]],
    ref: list[dict[str, Any]],
    generator: str,
    reference: str,
    path: Path,
) -> dict[str, Any]:
    """Judge `new` against `ref`; write AlpacaEval annotations to `path`; return the figures."""
    # Only instructions both sides answered are compared (a failure is counted, not scored).
    ref_by_id = {o["prompt_id"]: o for o in ref}
    new = [o for o in new if o["prompt_id"] in ref_by_id]
    ref = [ref_by_id[o["prompt_id"]] for o in new]
    probs, truncated = await _judge(ctx, new, ref)
    annotated = alpaca_annotations(
        prompts=new,
        outputs=[o["output"] for o in new],
        reference_outputs=[o["output"] for o in ref],
        probs=probs,
        generator=generator,
        reference_generator=reference,
        judge=ctx.judge_label,
    )
    atomic_write_json(path, annotated)
    # The judge is a ranker service and the reference a policy of this run, never AlpacaEval's
    # annotator and gpt4_1106_preview: choose_glm gives the minimal GLM, whose name goes with
    # every figure (the leaderboard GLM would lend them another judge's length term).
    return {**win_rate(annotated).as_dict(), "judge_truncated": truncated}


def _mean_length(outputs: list[dict[str, Any]]) -> float | None:
    return sum(len(o["output"]) for o in outputs) / len(outputs) if outputs else None


async def _best_of_rows(
    ctx: RunContext, k: int, base: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Policy k's best-of-n figures for every n > 1 of the config, each judged against the base."""
    prompts = _prompts(ctx)
    rows: dict[str, dict[str, Any]] = {}
    for n in ctx.cfg.evaluation.best_of:
        if n == 1:
            continue
        picked, failed = await generate_best_of(ctx, k, n, prompts)
        root = best_of_dir(ctx, k, n)
        _write_alpaca_outputs(root / "alpaca_eval_outputs.json", picked, _generator_name(ctx, k, n))
        rows[str(n)] = {
            "mean_length": _mean_length(picked),
            "failed_prompts": failed,
            # The ranker that picked the sample prefers it by construction: its own verdict on
            # the pick is inflated. `evaluation.judge` names a judge that did not pick.
            # By kind and model, as the plain rows: an address differs from stack to stack.
            "picked_by": ctx.ranker_labels.get(ctx.ranker.base_url, ctx.ranker.base_url),
            "judge": ctx.judge_label,
            "self_judged": ctx.judge is ctx.ranker,
            "vs_base": await _compare(
                ctx,
                new=picked,
                ref=base,
                generator=_generator_name(ctx, k, n),
                reference=_generator_name(ctx, 0, 1),
                path=root / "annotations_vs_base.json",
            ),
        }
    return rows


async def evaluate_policy(ctx: RunContext, k: int) -> dict[str, Any]:
    """Figures of policy k: lengths, win rates vs base and vs policy k-1, best-of-n rows."""
    outputs, failed = await generate_eval_outputs(ctx, k)
    metrics: dict[str, Any] = {
        "mean_length": _mean_length(outputs),
        "eval_prompts": len(outputs) + failed,
        "failed_prompts": failed,
        "judge": ctx.judge_label,
        "judge_is_run_ranker": ctx.judge is ctx.ranker,
    }
    base = eval_outputs(ctx, 0)
    for name, ref_k in (("vs_base", 0), ("vs_previous", k - 1)):
        if name == "vs_previous" and ref_k == 0:
            metrics[name] = metrics["vs_base"]
            continue
        metrics[name] = await _compare(
            ctx,
            new=outputs,
            ref=eval_outputs(ctx, ref_k),
            generator=_generator_name(ctx, k, 1),
            reference=_generator_name(ctx, ref_k, 1),
            path=_out_dir(ctx, k) / f"annotations_{name}.json",
        )
    metrics["best_of"] = await _best_of_rows(ctx, k, base)
    return metrics


async def run_base(ctx: RunContext) -> dict[str, Any]:
    """policy0.evaluate: the base model's answers, which every later policy is judged against."""
    await ensure_version(ctx, 0)
    outputs, failed = await generate_eval_outputs(ctx, 0)
    return {
        "mean_length": _mean_length(outputs),
        "eval_prompts": len(outputs) + failed,
        "failed_prompts": failed,
        "judge": ctx.judge_label,
        "judge_is_run_ranker": ctx.judge is ctx.ranker,
        "best_of": await _best_of_rows(ctx, 0, outputs),
    }


async def run(ctx: RunContext, k: int) -> dict[str, Any]:
    """iter{k}.evaluate: policy k against the base and against policy k-1."""
    await ensure_version(ctx, k)
    return await evaluate_policy(ctx, k)

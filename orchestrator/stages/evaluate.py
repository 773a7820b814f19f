"""Evaluation stage: policy k answers the evaluation instructions, and the judge compares.

Per policy k (0 = base), for every n in `evaluation.best_of`:
- n = 1: one answer per instruction (greedy by default), as AlpacaEval generates;
- n > 1: n samples, the run's ranker picks one (orchestrator/stages/best_of.py).
Each is written in AlpacaEval's format (`eval/policy{k}[/best_of_{n}]/alpaca_eval_outputs.json`,
for AlpacaEval 2.0 proper), and judged against the base's plain answers (and, for n = 1, against
policy k-1's) by the judge: `evaluation.judge`, or the run's ranker. The judgments are written as
AlpacaEval annotations, and the figures include AlpacaEval's length-controlled win rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.context import RunContext
from orchestrator.evaluation import alpaca_annotations, win_rate
from orchestrator.lc_winrate import GLM
from orchestrator.prompts import PromptRecord, read_prompts
from orchestrator.records import GenerationRecord
from orchestrator.shards import ShardStore, chunk
from orchestrator.stages.best_of import best_of_dir, generate_best_of
from orchestrator.stages.generate import generate_shards
from orchestrator.stages.swap import ensure_version
from pairloop.atomic import atomic_write_json
from pairloop.contracts.ranker import CompareItem, CompareRequest

__all__ = ["eval_outputs", "evaluate_policy", "generate_eval_outputs", "run", "run_base"]


def _out_dir(ctx: RunContext, k: int) -> Path:
    return ctx.run_dir / "eval" / f"policy{k}"


def _prompts(ctx: RunContext) -> list[PromptRecord]:
    return read_prompts(ctx.run_dir / "prompts" / "eval.jsonl")


def eval_outputs(ctx: RunContext, k: int) -> list[dict[str, Any]]:
    """[{prompt_id, prompt, output}] of policy k's plain answers, in instruction order."""
    prompts = _prompts(ctx)
    store = ShardStore(_out_dir(ctx, k) / "shards", GenerationRecord)
    count = len(chunk(prompts, ctx.cfg.shard_size))
    return [
        {
            "prompt_id": r.prompt_id,
            "prompt": r.prompt,
            # A prompt the generator could not answer has no response: an empty answer loses.
            "output": r.responses[0] if r.responses else "",
        }
        for r in store.read_all(count)
    ]


def _generator_name(ctx: RunContext, k: int, n: int) -> str:
    return ctx.version_label(k) if n == 1 else f"{ctx.version_label(k)}.best_of_{n}"


def _write_alpaca_outputs(
    path: Path, prompts: list[PromptRecord], outputs: list[dict[str, Any]], generator: str
) -> None:
    """AlpacaEval's model_outputs.json: exactly the evaluation instructions, its fields."""
    rows = []
    for p, o in zip(prompts, outputs, strict=True):
        row = {"instruction": p["prompt"], "output": o["output"], "generator": generator}
        if "dataset" in p:
            row["dataset"] = p["dataset"]
        rows.append(row)
    atomic_write_json(path, rows)


async def generate_eval_outputs(ctx: RunContext, k: int) -> list[dict[str, Any]]:
    """Policy k's plain answers (generated where not done yet); writes its AlpacaEval file."""
    ev = ctx.cfg.evaluation
    prompts = _prompts(ctx)
    await generate_shards(
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
    outputs = eval_outputs(ctx, k)
    _write_alpaca_outputs(
        _out_dir(ctx, k) / "alpaca_eval_outputs.json", prompts, outputs, _generator_name(ctx, k, 1)
    )
    return outputs


async def _judge(
    ctx: RunContext, new: list[dict[str, Any]], ref: list[dict[str, Any]]
) -> list[float]:
    """P(new beats ref) per prompt. Identical answers tie; an empty answer loses to a non-empty one."""
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
    return [float(p) for p in probs if p is not None]


def _lc_glm(ctx: RunContext) -> GLM:
    """AlpacaEval 2.0's leaderboard GLM on AlpacaEval's own instructions, else the minimal one."""
    ep = ctx.cfg.evaluation.prompts
    whole_alpaca_eval = (
        ep is not None
        and ep.source == "tatsu-lab/alpaca_eval"
        and ep.name == "alpaca_eval"
        and ep.limit is None
    )
    return "length_controlled_v1" if whole_alpaca_eval else "length_controlled_minimal"


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
    probs = await _judge(ctx, new, ref)
    annotated = alpaca_annotations(
        prompts=_prompts(ctx),
        outputs=[o["output"] for o in new],
        reference_outputs=[o["output"] for o in ref],
        probs=probs,
        generator=generator,
        reference_generator=reference,
        judge=ctx.judge_label,
    )
    atomic_write_json(path, annotated)
    return win_rate(annotated, glm=_lc_glm(ctx)).as_dict()


def _mean_length(outputs: list[dict[str, Any]]) -> float:
    return sum(len(o["output"]) for o in outputs) / len(outputs)


async def _best_of_rows(
    ctx: RunContext, k: int, base: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Policy k's best-of-n figures for every n > 1 of the config, each judged against the base."""
    prompts = _prompts(ctx)
    rows: dict[str, dict[str, Any]] = {}
    for n in ctx.cfg.evaluation.best_of:
        if n == 1:
            continue
        picked = await generate_best_of(ctx, k, n, prompts)
        root = best_of_dir(ctx, k, n)
        _write_alpaca_outputs(
            root / "alpaca_eval_outputs.json", prompts, picked, _generator_name(ctx, k, n)
        )
        rows[str(n)] = {
            "mean_length": _mean_length(picked),
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
    outputs = await generate_eval_outputs(ctx, k)
    metrics: dict[str, Any] = {
        "mean_length": _mean_length(outputs),
        "eval_prompts": len(outputs),
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
    outputs = await generate_eval_outputs(ctx, 0)
    return {
        "mean_length": _mean_length(outputs),
        "eval_prompts": len(outputs),
        "judge": ctx.judge_label,
        "judge_is_run_ranker": ctx.judge is ctx.ranker,
        "best_of": await _best_of_rows(ctx, 0, outputs),
    }


async def run(ctx: RunContext, k: int) -> dict[str, Any]:
    """iter{k}.evaluate: policy k against the base and against policy k-1."""
    await ensure_version(ctx, k)
    return await evaluate_policy(ctx, k)

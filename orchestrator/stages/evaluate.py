"""Evaluation stage: held-out prompts answered by policy k, judged by the ranker against the base
and the previous policy; outputs also written in AlpacaEval's format for AlpacaEval 2.0 proper.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.context import RunContext
from orchestrator.evaluation import win_rate
from orchestrator.prompts import read_prompts
from orchestrator.records import GenerationRecord
from orchestrator.shards import ShardStore, chunk
from orchestrator.stages.generate import generate_shards
from orchestrator.stages.swap import ensure_version
from pairloop.atomic import atomic_write_json
from pairloop.contracts.ranker import CompareItem, CompareRequest

__all__ = ["eval_outputs", "evaluate_policy", "generate_eval_outputs", "run", "run_base"]


def _out_dir(ctx: RunContext, k: int) -> Path:
    return ctx.run_dir / "eval" / f"policy{k}"


def eval_outputs(ctx: RunContext, k: int) -> list[dict[str, Any]]:
    """[{prompt_id, prompt, output}] of policy k on the eval prompts, in prompt order."""
    prompts = read_prompts(ctx.run_dir / "prompts" / "eval.jsonl")
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


async def generate_eval_outputs(ctx: RunContext, k: int) -> list[dict[str, Any]]:
    ev = ctx.cfg.evaluation
    prompts = read_prompts(ctx.run_dir / "prompts" / "eval.jsonl")
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
    # AlpacaEval's model_outputs.json: the fields its evaluator reads.
    atomic_write_json(
        _out_dir(ctx, k) / "alpaca_eval_outputs.json",
        [
            {
                "instruction": o["prompt"],
                "output": o["output"],
                "generator": ctx.version_label(k),
                "dataset": "pairloop-eval",
                "datasplit": "eval",
            }
            for o in outputs
        ],
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
        reply = await ctx.ranker.compare(CompareRequest(items=[it for _, it in batch]))
        for (i, _), res in zip(batch, reply.results, strict=True):
            probs[i] = res.prob_a_beats_b
    return [float(p) for p in probs if p is not None]


async def evaluate_policy(ctx: RunContext, k: int) -> dict[str, Any]:
    """Figures of policy k: mean length, and win rates vs base and vs policy k-1."""
    outputs = await generate_eval_outputs(ctx, k)
    lengths = [len(o["output"]) for o in outputs]
    metrics: dict[str, Any] = {
        "mean_length": sum(lengths) / len(lengths),
        "eval_prompts": len(outputs),
    }
    for name, ref_k in (("vs_base", 0), ("vs_previous", k - 1)):
        if name == "vs_previous" and ref_k == 0:
            metrics[name] = metrics["vs_base"]
            continue
        ref = eval_outputs(ctx, ref_k)
        probs = await _judge(ctx, outputs, ref)
        figures = win_rate(probs, lengths, [len(r["output"]) for r in ref])
        metrics[name] = figures.as_dict()
        atomic_write_json(
            _out_dir(ctx, k) / f"judgments_{name}.json",
            [
                {"prompt_id": o["prompt_id"], "prob_new_wins": p}
                for o, p in zip(outputs, probs, strict=True)
            ],
        )
    return metrics


async def run_base(ctx: RunContext) -> dict[str, Any]:
    """policy0.evaluate: the base model's answers, which every later policy is judged against."""
    await ensure_version(ctx, 0)
    outputs = await generate_eval_outputs(ctx, 0)
    lengths = [len(o["output"]) for o in outputs]
    return {"mean_length": sum(lengths) / len(lengths), "eval_prompts": len(outputs)}


async def run(ctx: RunContext, k: int) -> dict[str, Any]:
    """iter{k}.evaluate: policy k against the base and against policy k-1."""
    await ensure_version(ctx, k)
    return await evaluate_policy(ctx, k)

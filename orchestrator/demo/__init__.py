"""The embedded default: the whole loop on one machine, CPU included, with one command.

    pairloop demo            # or: make demo

Builds a tiny Llama-architecture chat model, starts Redis (the machine's if one answers at
PAIRLOOP_REDIS_URL, else a private one), the generator, the ranker and a Celery trainer worker as
local processes on loopback, runs 3 iterations on the 400 shipped prompts (`prompts.jsonl`), writes
the report, prints the summary table, and stops every process it started.

    pairloop demo --prompts my_prompts.jsonl   # your own prompts (a `prompt` field per line)

A file of your own goes through the same prompt admission as any run: prompts too long for the
tiny model's context are skipped (and counted in the report); slices shrink to fit a small file.

The ranker is a programmatic scorer with a stated preference (DEMO_RANKER below), so the report
shows the policy moving toward it: the final policy's win rate against the base on held-out
prompts, judged by that scorer, is printed at the end.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import SecretStr
from rich.console import Console

if TYPE_CHECKING:
    from orchestrator.embedded import StackSpec
    from orchestrator.manifest import Manifest

__all__ = ["DEMO_PREFERENCE", "DEMO_RANKER_ARGS", "demo_config", "run_demo"]

# The preference the demo aligns toward, and the ranker that encodes it.
DEMO_PREFERENCE = (
    "plain prose: the share of an answer's characters that are lowercase letters or spaces "
    "(no capitals, digits or symbols)"
)
DEMO_RANKER_ARGS = ["--backend", "scorer", "--model", "services.ranker.score_functions:plain_prose"]


def _packaged(name: str) -> Path:
    return Path(str(resources.files("orchestrator.demo") / name))


# Share of a user's file the demo plans to use: the rest is headroom for prompts that admission
# skips (too long for the tiny model, empty, duplicated), so a small file still runs to the end.
_USABLE_SHARE = 0.75


def _count_prompts(path: Path, field: str) -> int:
    """Distinct non-empty prompts of a user's file: the demo's slice sizes depend on it."""
    from orchestrator.config import PromptsConfig
    from orchestrator.prompts import load_prompt_source

    cfg = PromptsConfig(source=str(path), field=field, id_field=None)
    return len(load_prompt_source(cfg).records)


def _prompt_source(cfg: dict[str, Any], iterations: int, prompts_file: Path, field: str) -> None:
    """Point the demo at a user's prompt file, shrinking the slices when the file is small."""
    p = cfg["prompts"]
    p.update(source=str(prompts_file.resolve()), field=field)
    if field != "prompt":
        p["id_field"] = None
    usable = int(_count_prompts(prompts_file, field) * _USABLE_SHARE)
    need = p["eval_prompts"] + p["per_iteration"] * iterations
    if usable < need:
        p["eval_prompts"] = max(1, usable // 6)
        p["per_iteration"] = max(1, (usable - p["eval_prompts"]) // iterations)
        cfg["shard_size"] = min(cfg["shard_size"], p["per_iteration"])


def demo_config(
    *,
    store: Path,
    base_model: Path,
    generator_url: str,
    ranker_url: str,
    redis_url: str,
    iterations: int,
    prompts_file: Path | None = None,
    prompt_field: str = "prompt",
) -> dict[str, Any]:
    """The demo's run config as a dict: the packaged YAML with this machine's paths and URLs;
    `prompts_file` replaces the shipped prompts (its `prompt_field` holds the text)."""
    cfg: dict[str, Any] = yaml.safe_load(_packaged("demo.yaml").read_text())
    cfg.update(
        model_store=str(store),
        base_model=str(base_model),
        iterations=iterations,
    )
    cfg["prompts"]["source"] = str(_packaged("prompts.jsonl"))
    if prompts_file is not None:
        _prompt_source(cfg, iterations, prompts_file, prompt_field)
    cfg["services"].update(
        generator_urls=[generator_url], ranker_url=ranker_url, redis_url=redis_url
    )
    return cfg


def run_demo(
    workdir: Path,
    *,
    iterations: int = 3,
    console: Console | None = None,
    prompts_file: Path | None = None,
    prompt_field: str = "prompt",
) -> int:
    """Run the demo under `workdir`; return the exit status (0: the loop completed)."""
    from orchestrator.config import ConfigError
    from orchestrator.embedded import StackSpec
    from pairloop.errors import PairloopError
    from pairloop.settings import RedisSettings
    from pairloop_local.processes import ProcessFailedError
    from pairloop_local.tiny_models import build_tiny_chat_model

    console = console or Console()
    if prompts_file is not None and not prompts_file.is_file():
        console.print(f"[red]demo failed:[/red] --prompts: {prompts_file} is not a file")
        return 2
    started = time.monotonic()
    store = workdir / "store"
    base = store / "models" / "tiny-llama"
    if not (base / "config.json").is_file():
        console.print("building the tiny base model ...")
        build_tiny_chat_model(base, arch="llama", seed=0)
    spec = StackSpec(
        store=store,
        base_model=base,
        ranker_args=DEMO_RANKER_ARGS,
        redis_url=RedisSettings().redis_url,
    )
    console.print(
        f"starting redis, generator, ranker and trainer worker (logs: {workdir / 'logs'})"
    )
    try:
        run_dir, manifest = _run_on_stack(
            spec,
            workdir,
            iterations=iterations,
            console=console,
            prompts_file=prompts_file,
            prompt_field=prompt_field,
        )
    except (PairloopError, ProcessFailedError, ConfigError) as exc:
        message = exc.message if isinstance(exc, PairloopError) else str(exc)
        console.print(f"[red]demo failed:[/red] {message}", highlight=False)
        console.print(f"service logs: {workdir / 'logs'}")
        return 1
    _print_outcome(run_dir, manifest, iterations=iterations, console=console)
    console.print(f"finished in {time.monotonic() - started:.0f} s")
    return 0


def _run_on_stack(
    spec: StackSpec,
    workdir: Path,
    *,
    iterations: int,
    console: Console,
    prompts_file: Path | None,
    prompt_field: str,
) -> tuple[Path, Manifest]:
    """Start the local stack, create and execute the demo run, stop the stack."""
    from orchestrator.embedded import LocalStack
    from orchestrator.loop import create_run, execute_run
    from orchestrator.settings import OrchestratorSettings
    from pairloop.atomic import atomic_write_text

    with LocalStack(spec, workdir) as stack:
        redis_kind = (
            "a private redis-server"
            if stack.redis and stack.redis.started_here
            else "the machine's Redis"
        )
        console.print(
            f"stack up: generator {stack.generator_url}, ranker {stack.ranker_url}, "
            f"{redis_kind} at {stack.redis_url}"
        )
        cfg = demo_config(
            store=spec.store,
            base_model=spec.base_model,
            generator_url=stack.generator_url,
            ranker_url=stack.ranker_url,
            redis_url=stack.redis_url,
            iterations=iterations,
            prompts_file=prompts_file,
            prompt_field=prompt_field,
        )
        config_path = workdir / "demo-config.yaml"
        atomic_write_text(config_path, yaml.safe_dump(cfg, sort_keys=False))
        run_dir = create_run(config_path, run_id=f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
        settings = OrchestratorSettings(generator_admin_token=SecretStr(stack.admin_token))
        manifest = asyncio.run(execute_run(run_dir, console=console, settings=settings))
    return run_dir, manifest


def _print_outcome(run_dir: Path, manifest: Manifest, *, iterations: int, console: Console) -> None:
    from orchestrator.report import best_of_rows, judge_line
    from orchestrator.summary import print_summary

    print_summary(run_dir, manifest, console=console)
    from orchestrator.admission import admission_summary

    setup = manifest.stages.get("setup")
    if setup and setup.metrics.get("prompts"):
        console.print(f"prompts: {admission_summary(setup.metrics['prompts'])}", highlight=False)
    final = manifest.stages.get(f"iter{iterations}.evaluate")
    vs_base = final.metrics.get("vs_base", {}) if final else {}
    console.print(f"preference: {DEMO_PREFERENCE}")
    console.print(f"judge: {judge_line(manifest)}")
    console.print(
        f"final policy vs base: win rate {vs_base.get('win_rate', float('nan')):.3f} "
        f"(length-controlled {_fmt(vs_base.get('lc_win_rate'))}, AlpacaEval's "
        f"{vs_base.get('lc_glm', 'GLM')}) on {vs_base.get('n', 0):.0f} evaluation instructions"
    )
    for row in best_of_rows(manifest):
        if row["n"] > 1:
            console.print(
                f"policy {row['policy']} best-of-{row['n']} (the ranker picks) vs base: win rate "
                f"{_fmt(row['win_rate_vs_base'])}, length-controlled "
                f"{_fmt(row['lc_win_rate_vs_base'])}, mean length {_fmt(row['mean_length'], '{:.1f}')}"
            )
    console.print(f"run directory: {run_dir}")


def _fmt(value: object, fmt: str = "{:.3f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"

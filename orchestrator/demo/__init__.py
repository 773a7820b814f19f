"""The embedded default: the whole loop on one machine, CPU included, with one command.

    pairloop demo            # or: make demo; again with the same --workdir: resumes an unfinished one
    pairloop demo --new      # a fresh run even if one is unfinished

Builds a tiny Llama-architecture chat model, then runs `configs/demo.yaml` (this package's
`demo.yaml`) on the local stack, as `pairloop run configs/demo.yaml --local` would: Redis (a
private one with a password, unless PAIRLOOP_REDIS_URL names one), the generator, the ranker and
a Celery trainer worker as local processes on loopback; 3 iterations on the 400 shipped prompts
(`prompts.jsonl`), the report, the summary table; every process it started is stopped, even if
the demo is killed. A demo that was interrupted (Ctrl-C, `kill -9`, a crash) is continued by
running `pairloop demo` again.

    pairloop demo --prompts my_prompts.jsonl   # your own prompts (a `prompt` field per line)

A file of your own goes through the same prompt admission as any run: prompts too long for the
tiny model's context are skipped (and counted in the report); slices shrink to fit a small file.

One demo at a time per workdir: a second `pairloop demo` in the same workdir stops at once with
the running one's pid (`demo_lock`, an flock on WORKDIR/.demo.lock that the kernel drops if the
holder dies). The tiny base model is built in a staging directory and renamed into place with its
marker last, so a demo killed mid-build rebuilds it instead of running on a broken one.

The ranker is a programmatic scorer with a stated preference (DEMO_RANKER below), so the report
shows the policy moving toward it: the final policy's win rate against the base on held-out
prompts, judged by that scorer, is printed at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console

from orchestrator.runs import RunLockedError

if TYPE_CHECKING:
    from orchestrator.manifest import Manifest

__all__ = [
    "DEMO_PREFERENCE",
    "DEMO_RANKER_ARGS",
    "DemoLockedError",
    "demo_config",
    "demo_lock",
    "find_unfinished",
    "run_demo",
]

LOCK_FILE = ".demo.lock"

# The preference the demo aligns toward, and the ranker that encodes it.
DEMO_PREFERENCE = (
    "plain prose: the share of an answer's characters that are lowercase letters or spaces "
    "(no capitals, digits or symbols)"
)
DEMO_RANKER_ARGS = ["--backend", "scorer", "--model", "services.ranker.score_functions:plain_prose"]


class DemoLockedError(RunLockedError):
    """Another `pairloop demo` is running in this workdir."""


@contextlib.contextmanager
def demo_lock(workdir: Path) -> Iterator[None]:
    """Hold WORKDIR/.demo.lock (flock) for the demo's lifetime; the holder's pid is written in it."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise DemoLockedError(
                f"another pairloop demo (pid {holder}) is running in {workdir}; wait for it, "
                "stop it, or use another --workdir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield


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
    iterations: int,
    generator_url: str | None = None,
    ranker_url: str | None = None,
    redis_url: str | None = None,
    prompts_file: Path | None = None,
    prompt_field: str = "prompt",
    loss: str = "sigmoid",
) -> dict[str, Any]:
    """The demo's run config as a dict: the packaged YAML with this machine's paths;
    `prompts_file` replaces the shipped prompts (its `prompt_field` holds the text).

    Service URLs are only for running it on a stack started elsewhere (the tests' shared one);
    `--local` fills them in itself.
    """
    cfg: dict[str, Any] = yaml.safe_load(_packaged("demo.yaml").read_text())
    cfg.update(
        model_store=str(store),
        base_model=str(base_model),
        iterations=iterations,
    )
    cfg["prompts"]["source"] = str(_packaged("prompts.jsonl"))
    cfg["dpo"].update(demo_loss(loss))
    if prompts_file is not None:
        _prompt_source(cfg, iterations, prompts_file, prompt_field)
    urls = {
        "generator_urls": [generator_url] if generator_url else None,
        "ranker_url": ranker_url,
        "redis_url": redis_url,
    }
    cfg["services"].update({k: v for k, v in urls.items() if v is not None})
    return cfg


# Per-loss knobs where the demo's DPO values do not suit (the rest keep demo.yaml's): SimPO's
# published beta and margin (its beta scales an average log-prob, 10-100x DPO's).
DEMO_LOSS_KNOBS: dict[str, dict[str, Any]] = {"simpo": {"beta": 2.5, "simpo_gamma": 0.25}}


def demo_loss(loss: str) -> dict[str, Any]:
    """The demo config's `dpo` changes for `loss`; ConfigError naming the accepted losses."""
    from orchestrator.config import ConfigError
    from pairloop.losses import ACCEPTED_LOSSES

    if loss not in ACCEPTED_LOSSES:
        raise ConfigError(f"--loss {loss!r} is unknown; accepted: {', '.join(ACCEPTED_LOSSES)}")
    return {"loss_type": loss, **DEMO_LOSS_KNOBS.get(loss, {})}


def _frozen_loss(frozen: dict[str, Any]) -> list[str]:
    names = (frozen.get("dpo") or {}).get("loss_type", "sigmoid")
    return [names] if isinstance(names, str) else list(names)


def find_unfinished(
    runs_root: Path, *, iterations: int, prompts_source: str | None = None, loss: str = "sigmoid"
) -> Path | None:
    """The newest demo run under `runs_root` that did not complete, with `iterations` (and, if
    given, the prompt source `prompts_source`)."""
    from orchestrator.manifest import load_manifest
    from orchestrator.runs import FROZEN_CONFIG

    candidates = []
    for manifest_path in runs_root.glob("demo-*/manifest.json"):
        try:
            m = load_manifest(manifest_path.parent)
            frozen = yaml.safe_load((manifest_path.parent / FROZEN_CONFIG).read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue  # not a readable run: leave it alone
        if prompts_source is not None and frozen["prompts"]["source"] != prompts_source:
            continue  # another prompt file is another demo
        if _frozen_loss(frozen) != [loss]:
            continue  # so is another loss
        if m.status != "completed" and m.iterations == iterations:
            candidates.append((m.created_at, manifest_path.parent))
    return max(candidates)[1] if candidates else None


def run_demo(
    workdir: Path,
    *,
    iterations: int = 3,
    new: bool = False,
    console: Console | None = None,
    prompts_file: Path | None = None,
    prompt_field: str = "prompt",
    loss: str = "sigmoid",
) -> tuple[Path, Manifest]:
    """Run (or continue) the demo under `workdir`; return (run directory, final manifest).

    Errors propagate (the CLI turns them into messages with the next step).
    """
    from orchestrator.config import ConfigError

    console = console or Console()
    if prompts_file is not None and not prompts_file.is_file():
        raise ConfigError(f"--prompts: {prompts_file} is not a file")  # before anything is built
    demo_loss(loss)  # an unknown --loss fails before anything is built
    with demo_lock(workdir):
        return _run_demo(
            workdir,
            iterations=iterations,
            new=new,
            console=console,
            prompts_file=prompts_file,
            prompt_field=prompt_field,
            loss=loss,
        )


def _run_demo(
    workdir: Path,
    *,
    iterations: int,
    new: bool,
    console: Console,
    prompts_file: Path | None,
    prompt_field: str,
    loss: str,
) -> tuple[Path, Manifest]:
    from orchestrator.local import run_local
    from orchestrator.runs import create_run, new_run_id
    from pairloop.atomic import atomic_write_text
    from pairloop_local.tiny_models import build_tiny_chat_model, is_built

    started = time.monotonic()
    store = workdir / "store"
    base = store / "models" / "tiny-llama"
    if not is_built(base):
        console.print("building the tiny base model ...")
        build_tiny_chat_model(base, arch="llama", seed=0)
    source = str((prompts_file or _packaged("prompts.jsonl")).resolve())
    unfinished = (
        None
        if new
        else find_unfinished(
            store / "runs", iterations=iterations, prompts_source=source, loss=loss
        )
    )
    if unfinished is not None:
        console.print(f"resuming run {unfinished.name} (`pairloop demo --new` starts a fresh one)")
        run_dir = unfinished
    else:
        cfg = demo_config(
            store=store,
            base_model=base,
            iterations=iterations,
            prompts_file=prompts_file,
            prompt_field=prompt_field,
            loss=loss,
        )
        config_path = workdir / "demo-config.yaml"
        atomic_write_text(config_path, yaml.safe_dump(cfg, sort_keys=False))
        tag = "" if loss == "sigmoid" else f"{loss}-"
        run_dir = create_run(config_path, run_id=new_run_id(f"demo-{tag}".rstrip("-")))
    manifest = run_local(run_dir, console=console)
    _print_outcome(run_dir, manifest, iterations=iterations, console=console)
    console.print(f"finished in {time.monotonic() - started:.0f} s")
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
                + ("; self-judged (that ranker also judged)" if row["self_judged"] else "")
            )
    console.print(f"run directory: {run_dir}")


def _fmt(value: object, fmt: str = "{:.3f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"

"""Runs on disk: create a run directory from a config, load it back, and lock it while it executes.

run_dir = create_run("configs/demo.yaml")      # validates everything before any work
cfg, manifest = load_run(run_dir)              # the frozen config and the manifest
with run_lock(run_dir): ...                    # one executing process per run
"""

from __future__ import annotations

import contextlib
import fcntl
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from orchestrator.admission import PromptMeter, TokenizerMeter, admit_eval_prompts, admit_prompts
from orchestrator.config import (
    ConfigError,
    RunConfig,
    check_paths,
    config_fingerprint,
    load_run_config,
)
from orchestrator.hub import fetch_base_model
from orchestrator.manifest import MANIFEST_NAME, Manifest, load_manifest
from orchestrator.prompts import (
    exclude_instructions,
    load_eval_prompts,
    load_prompt_source,
    normalise_instruction,
    read_prompts,
    write_prompts,
)
from orchestrator.run_state import resume_command
from pairloop.atomic import atomic_write_text

__all__ = [
    "FROZEN_CONFIG",
    "RunLockedError",
    "create_run",
    "eval_overlap",
    "load_run",
    "new_run_id",
    "run_lock",
]

FROZEN_CONFIG = "config.yaml"


class RunLockedError(RuntimeError):
    """Another orchestrator process is executing this run."""


def new_run_id(prefix: str) -> str:
    """`PREFIX-YYYYmmdd-HHMMSS-xxxxxx`: readable, sortable, and unique even within one second."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def create_run(
    config_path: str | Path,
    *,
    run_id: str | None = None,
    meter: PromptMeter | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Validate the config and its inputs, admit the prompts, then create the run directory (no
    service is touched).

    Prompt admission (`orchestrator.admission`) measures prompts with the base model's tokenizer
    and chat template (or `meter`); what it skipped is listed in RUN_DIR/prompts/skipped.jsonl and
    counted in the setup stage's metrics. Raises ConfigError for anything wrong with the config or
    a pool too small, before a single file is written.
    """
    started = time.time()
    cfg = load_run_config(config_path, overrides)
    if run_id is not None:
        cfg = RunConfig.model_validate({**cfg.model_dump(), "run_id": run_id})
    fetch_base_model(cfg)  # a hub id: downloaded into MODEL_STORE/hub/ before any check
    check_paths(cfg)
    skipped: list[dict[str, object]] = []
    pool = load_prompt_source(cfg.prompts)
    eval_source = cfg.evaluation.prompts
    excluded = 0
    eval_admission = None
    if eval_source is None:
        slices, admission = admit_prompts(pool, cfg, meter=meter, on_skip=skipped.append)
    else:
        # The evaluation has instructions of its own: none of them may be trained on, and no
        # training prompt is held out for it.
        eval_prompts = load_eval_prompts(eval_source)
        pool.records, excluded = exclude_instructions(pool.records, eval_prompts)
        meter = meter or TokenizerMeter.from_pretrained(cfg.base_model)
        # The same rule as training prompts: an instruction that cannot fit is left out (or cut)
        # and counted, never generated into an error and scored as an empty answer.
        eval_admission = admit_eval_prompts(
            eval_prompts,
            cfg,
            meter=meter,
            on_skip=lambda s: skipped.append({**s, "slice": "eval"}),
        )
        no_holdout = cfg.prompts.model_copy(update={"eval_prompts": 0})
        slices, admission = admit_prompts(
            pool,
            cfg.model_copy(update={"prompts": no_holdout}),
            meter=meter,
            on_skip=skipped.append,
        )
        slices["eval"] = eval_admission.prompts
    rid = cfg.run_id or new_run_id(Path(config_path).stem)
    cfg = cfg.model_copy(update={"run_id": rid})
    run_dir = Path(cfg.model_store) / "runs" / rid
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Atomic claim: of two creators of one run id, exactly one gets the directory.
        run_dir.mkdir()
    except FileExistsError:
        if (run_dir / MANIFEST_NAME).exists():
            raise ConfigError(
                f"run {rid} already exists at {run_dir}; use `{resume_command(run_dir)}`"
            ) from None
        raise ConfigError(
            f"run {rid} already exists at {run_dir} (being created, or left half-created by a "
            "crash: remove that directory to reuse the id)"
        ) from None
    for name, prompts in slices.items():
        write_prompts(run_dir / "prompts" / f"{name}.jsonl", prompts)
    write_prompts(run_dir / "prompts" / "skipped.jsonl", skipped)
    atomic_write_text(
        run_dir / FROZEN_CONFIG, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    )
    manifest = Manifest(run_id=rid, config_fingerprint=cfg.fingerprint(), iterations=cfg.iterations)
    manifest.stage("setup").state = "done"
    manifest.stage("setup").metrics = {
        **{name: len(p) for name, p in slices.items()},
        "prompts": admission.metrics(),
        **({"eval_admission": eval_admission.metrics()} if eval_admission else {}),
        "eval_source": eval_source.source if eval_source else "held out of prompts.source",
        "config_overrides": list(overrides),
        "training_prompts_removed_as_eval": excluded,
        # Read back from the files just written: what later stages will actually use.
        "eval_instructions_in_training": eval_overlap(run_dir),
    }
    manifest.stage("setup").artifacts = {"skipped_prompts": "prompts/skipped.jsonl"}
    # Prompt admission's wall time (the tokenizer pass over the pool), for the report's time plot.
    manifest.stage("setup").started_at = started
    manifest.stage("setup").seconds = time.time() - started
    manifest.save(run_dir)
    return run_dir


def eval_overlap(run_dir: Path) -> int:
    """Training prompts (every `iteration_k` slice on disk) whose text is an evaluation instruction
    (`eval.jsonl`, and `evaluation.prompts`' source rows were compared the same way): must be 0."""
    folder = run_dir / "prompts"
    evaluation = {normalise_instruction(p["prompt"]) for p in read_prompts(folder / "eval.jsonl")}
    return sum(
        normalise_instruction(p["prompt"]) in evaluation
        for path in sorted(folder.glob("iteration_*.jsonl"))
        for p in read_prompts(path)
    )


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive flock on RUN_DIR/.lock; the kernel drops it if the process dies."""
    with open(run_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"run {run_dir} is being executed by another process") from None
        yield


def load_run(run_dir: Path) -> tuple[RunConfig, Manifest]:
    """The frozen config and the manifest of RUN_DIR; refuses a config edited after the start."""
    frozen = yaml.safe_load((run_dir / FROZEN_CONFIG).read_text())
    cfg = RunConfig.model_validate(frozen)
    manifest = load_manifest(run_dir)
    if manifest.config_fingerprint != config_fingerprint(frozen):
        raise ConfigError(
            f"{run_dir / FROZEN_CONFIG} was edited after the run started (fingerprint differs); "
            "results would mix two configs. Start a new run instead."
        )
    return cfg, manifest

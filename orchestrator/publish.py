"""The final policy's model card, and (opt-in) its upload with the datasets to the Hugging Face hub.

    RUN_DIR/checkpoints/policy{N}/README.md     always: base model, recipe, iterations, win rates
    push_to_hub: {model_id: me/my-dpo, dataset_id: me/my-dpo-pairs}     # in the run config

Called by the report stage once every iteration is trained. The upload uses
`huggingface_hub.HfApi.upload_folder` with the token huggingface_hub finds itself (`HF_TOKEN`, or
`hf auth login`); without the hub (`HF_HUB_OFFLINE=1`, no network) it fails in one line that
says so, after the card is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import RunConfig
from orchestrator.hub import hub_id_of
from orchestrator.manifest import Manifest
from orchestrator.report import iteration_rows, judge_line
from pairloop.atomic import atomic_write_text
from pairloop.errors import PairloopError

__all__ = ["PushError", "final_policy_dir", "push_to_hub", "write_model_card"]

CARD = "README.md"
# Trainer bookkeeping in a published checkpoint that a hub user has no use for.
_PRIVATE = ["pairloop_*", ".pairloop*", "COMPLETE*"]


class PushError(PairloopError):
    """The upload to the hub failed (offline, no token, no access)."""


def final_policy_dir(run_dir: Path, cfg: RunConfig) -> Path:
    return run_dir / "checkpoints" / f"policy{cfg.iterations}"


def _fmt(value: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def write_model_card(run_dir: Path, cfg: RunConfig, manifest: Manifest) -> Path | None:
    """Write README.md (a hub model card) into the final policy's folder; None if not trained."""
    folder = final_policy_dir(run_dir, cfg)
    if not folder.is_dir():
        return None
    base = hub_id_of(cfg) or Path(cfg.base_model).name
    meta: dict[str, Any] = {
        "base_model": base,
        "library_name": "transformers",
        "tags": ["dpo", "trl", "iterative-dpo", "pairloop"],
    }
    if cfg.push_to_hub and cfg.push_to_hub.dataset_id:
        meta["datasets"] = [cfg.push_to_hub.dataset_id]
    dpo = cfg.dpo
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {cfg.push_to_hub.model_id if cfg.push_to_hub else manifest.run_id}",
        "",
        f"`{base}` after {cfg.iterations} iterations of DPO with an external ranker (pairloop run "
        f"`{manifest.run_id}`): each iteration, the current policy answered "
        f"{cfg.prompts.per_iteration} fresh prompts {cfg.samples_per_prompt} times, the ranker "
        "scored every answer, the best and worst made a pair (ties dropped), and TRL's DPO "
        "trained the next policy on them.",
        "",
        "## Recipe",
        "",
        f"- prompts: `{cfg.prompts.source}`, {cfg.prompts.per_iteration} per iteration",
        f"- reference: {cfg.reference}; beta {dpo.beta}, learning rate {dpo.learning_rate}, "
        f"{dpo.num_train_epochs:g} epoch(s), loss {dpo.loss_type}, max length {dpo.max_length}",
        f"- judge of the win rates: {judge_line(manifest)}",
        "",
        "## Results per iteration",
        "",
        "| iteration | pairs | DPO loss (mean of steps) | eval loss | eval reward acc. "
        "| win rate vs base | LC win rate vs base | mean length |",
        "|---" * 8 + "|",
    ]
    for r in iteration_rows(manifest):
        lines.append(
            f"| {r['iteration']} | {_fmt(r.get('pairs'), '{}')} | "
            f"{_fmt(r.get('train_loss'), '{:.4f}')} | {_fmt(r.get('eval_loss'), '{:.4f}')} | "
            f"{_fmt(r.get('eval_reward_accuracy'), '{:.2f}')} | "
            f"{_fmt(r.get('win_rate_vs_base'))} | {_fmt(r.get('lc_win_rate_vs_base'))} | "
            f"{_fmt(r.get('mean_length'), '{:.1f}')} |"
        )
    datasets = (
        f"`{cfg.push_to_hub.dataset_id}`"
        if cfg.push_to_hub and cfg.push_to_hub.dataset_id
        else "the run's `dataset/` folder"
    )
    lines += [
        "",
        "## Datasets",
        "",
        f"The preference pairs of every iteration: {datasets}, splits `train_iteration_k` / "
        "`test_iteration_k`, columns `prompt_id, prompt, chosen, rejected, "
        "all_generated_responses, all_rm_scores` (Snorkel's format).",
        "",
    ]
    path = folder / CARD
    atomic_write_text(path, "\n".join(lines))
    return path


def push_to_hub(run_dir: Path, cfg: RunConfig) -> dict[str, str]:
    """Upload the final policy (with its card) and, if named, the datasets; return their URLs."""
    push = cfg.push_to_hub
    if push is None:
        return {}
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi()
    uploads = [("model", push.model_id, final_policy_dir(run_dir, cfg))]
    if push.dataset_id:
        uploads.append(("dataset", push.dataset_id, run_dir / "dataset"))
    urls: dict[str, str] = {}
    for kind, repo_id, folder in uploads:
        try:
            api.create_repo(repo_id, repo_type=kind, private=push.private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                repo_type=kind,
                folder_path=folder,
                ignore_patterns=_PRIVATE,
                commit_message=f"pairloop run {cfg.run_id}",
            )
        except OfflineModeIsEnabled:
            raise PushError(
                f"push_to_hub: the hub is off (HF_HUB_OFFLINE); {kind} {repo_id} was not "
                f"uploaded; `pairloop push {run_dir}` uploads it later"
            ) from None
        except (HfHubHTTPError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PushError(
                f"push_to_hub: uploading {kind} {repo_id} failed ({first}); check HF_TOKEN and "
                f"your access, then `pairloop push {run_dir}`"
            ) from None
        urls[kind] = str(getattr(commit, "commit_url", repo_id))
    return urls

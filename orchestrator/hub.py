"""A base model named by its Hugging Face hub id (`model_name_or_path` style), brought into the store.

    base_model: mistralai/Mistral-7B-Instruct-v0.2     # in a run config: no such folder in the store
    -> MODEL_STORE/hub/mistralai/Mistral-7B-Instruct-v0.2   (where generator and trainer read it)

`create_run` calls `fetch_base_model` before it checks any path: the weights are downloaded with
`huggingface_hub.snapshot_download` straight into the store (a gated model needs `HF_TOKEN` with
access to it, read by huggingface_hub itself). Without the hub (`HF_HUB_OFFLINE=1`, no network), a
snapshot already in the Hugging Face cache is copied in; with neither, one line says what to do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from orchestrator.config import HUB_DIR, ConfigError, RunConfig, looks_like_hub_id

__all__ = ["HUB_DIR", "fetch_base_model", "hub_id_of", "hub_model_dir", "looks_like_hub_id"]

# What the generator, the trainer and `pairloop plan` read of a checkpoint (no .bin, no .pth, no
# original/ consolidated weights: safetensors only, as the generator's swap validates them).
_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def hub_model_dir(store: Path, repo_id: str) -> Path:
    """Where a hub model lives in the store: MODEL_STORE/hub/ORG/NAME."""
    return store / HUB_DIR / repo_id


def hub_id_of(cfg: RunConfig) -> str | None:
    """The hub id the run's base model came from, or None for a folder the user put there."""
    base, root = Path(cfg.base_model), Path(cfg.model_store) / HUB_DIR
    try:
        rel = base.relative_to(root)
    except ValueError:
        return None
    return rel.as_posix() if looks_like_hub_id(rel.as_posix()) else None


def fetch_base_model(cfg: RunConfig) -> Path | None:
    """Download the run's hub base model into the store unless it is there; None if not a hub id.

    Raises ConfigError, in one line, when it can be neither downloaded nor found in the cache.
    """
    repo_id = hub_id_of(cfg)
    if repo_id is None:
        return None
    target = Path(cfg.base_model)
    if (target / "config.json").is_file():
        return target
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    staging = target.with_name(f".{target.name}.download")
    try:
        try:
            snapshot_download(repo_id, local_dir=staging, allow_patterns=_PATTERNS)
        except LocalEntryNotFoundError:
            # No hub (offline, or unreachable): a snapshot the HF cache already holds will do.
            cached = snapshot_download(repo_id, allow_patterns=_PATTERNS, local_files_only=True)
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(cached, staging, symlinks=False)  # the blobs, not links into the cache
    except GatedRepoError:
        raise ConfigError(
            f"base_model: {repo_id} is gated; accept its licence on its hub page and set "
            "HF_TOKEN to a token with access, then run again"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"base_model: {repo_id} is neither a folder in model_store {cfg.model_store} nor a "
            "hub model (or it is private: set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"base_model: {repo_id} is not in model_store and the hub cannot be reached (offline: "
            f"HF_HUB_OFFLINE, or no network); download it where the hub is reachable: `hf download "
            f"{repo_id} --local-dir {target}`"
        ) from None
    except HfHubHTTPError as exc:
        raise ConfigError(
            f"base_model: downloading {repo_id} failed: {exc}".splitlines()[0]
        ) from None
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target

"""`base_model` as a hub id (`org/name`): fetched into MODEL_STORE/hub/org/name at run creation,
from the Hugging Face cache when the hub cannot be reached, else one clear line."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, check_paths, load_run_config
from pairloop_local.processes import free_port

REPO = "tinyorg/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cli(*args: str, hf_home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def _populate_cache(hf_home: Path, model: Path) -> None:
    """The layout huggingface_hub writes: blobs by hash, a snapshot of symlinks, refs/main."""
    repo = hf_home / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for src in model.rglob("*"):
        if not src.is_file():
            continue
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / src.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def test_a_hub_id_resolves_into_the_store(write_config: Callable[..., Path], store: Path) -> None:
    cfg = load_run_config(write_config(base_model=REPO))
    assert Path(cfg.base_model) == store / "hub" / REPO
    # A folder of that name inside the store stays a folder.
    shutil.copytree(store / "models" / "base", store / REPO)
    assert Path(load_run_config(write_config(base_model=REPO)).base_model) == store / REPO


def test_offline_without_a_cached_copy_is_one_clear_line(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    done = _cli("run", str(write_config(base_model=REPO)), hf_home=tmp_path / "hf")
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"base_model: {REPO} is not in model_store and the hub cannot be reached" in line
    assert f"hf download {REPO} --local-dir" in line and "Traceback" not in line


def test_a_cached_snapshot_is_copied_into_the_store(
    write_config: Callable[..., Path], store: Path, tmp_path: Path
) -> None:
    hf_home = tmp_path / "hf"
    _populate_cache(hf_home, store / "models" / "base")
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_config(
        base_model=REPO, services={"generator_urls": [dead], "ranker_url": dead, "retries": 0}
    )
    done = _cli("run", str(config), "--run-id", "hub", hf_home=hf_home)
    assert done.returncode == 1, done.stdout + done.stderr  # created; its services are not there
    target = store / "hub" / REPO
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        path = target / name
        assert path.is_file() and not path.is_symlink(), name  # a copy, not a link into the cache
        assert path.read_bytes() == (store / "models" / "base" / name).read_bytes()
    assert not (target / ".cache").exists()
    frozen = yaml.safe_load((store / "runs" / "hub" / "config.yaml").read_text())
    assert frozen["base_model"] == str(target)


def test_a_missing_store_says_what_to_download(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = load_run_config(write_config(model_store=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="is not a directory; create it") as caught:
        check_paths(cfg)
    assert f"hf download ORG/NAME --local-dir {tmp_path / 'nowhere'}/models/NAME" in str(
        caught.value
    )

"""Checkpoint manifests: what the generator and trainer check before a checkpoint goes live."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pairloop.checkpoints import compare_checkpoints, read_manifest
from pairloop.errors import ValidationError


@pytest.fixture()
def ckpt(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_models["llama"], dst)
    return dst


def test_manifest_matches_model(tiny_models: dict[str, Path]) -> None:
    m = read_manifest(tiny_models["llama"])
    assert m.tensors["lm_head.weight"].shape[1] == m.config["hidden_size"]
    assert m.tensors["lm_head.weight"].dtype == "F32"
    assert m.num_parameters > 100_000


def test_identical_checkpoints_are_compatible(ckpt: Path, tiny_models: dict[str, Path]) -> None:
    assert compare_checkpoints(read_manifest(tiny_models["llama"]), read_manifest(ckpt)) == []


def test_shape_name_and_dtype_problems_are_named(ckpt: Path, tiny_models: dict[str, Path]) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    tensors["model.extra.weight"] = torch.ones(3)
    del tensors["lm_head.weight"]
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].half()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    problems = "\n".join(
        compare_checkpoints(read_manifest(tiny_models["llama"]), read_manifest(ckpt))
    )
    assert "model.norm.weight has shape [7]" in problems
    assert "unexpected tensors" in problems and "model.extra.weight" in problems
    assert "missing" in problems and "lm_head.weight" in problems
    assert "model.embed_tokens.weight has dtype F16" in problems


def test_config_mismatch_is_named(ckpt: Path, tiny_models: dict[str, Path]) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    problems = compare_checkpoints(read_manifest(tiny_models["llama"]), read_manifest(ckpt))
    assert any("num_hidden_layers is 3" in p for p in problems)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 7),
            "not a readable safetensors",
        ),
        (lambda d: (d / "model.safetensors").unlink(), "no *.safetensors"),
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "config.json").write_text("{nope"), "not valid JSON"),
    ],
)
def test_broken_checkpoints_raise_clear_errors(ckpt: Path, damage, message: str) -> None:
    damage(ckpt)
    with pytest.raises(ValidationError, match=message.replace("*", r"\*")):
        read_manifest(ckpt)


def test_truncated_weights_are_detected(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 64])
    with pytest.raises(ValidationError, match="not a readable safetensors"):
        read_manifest(ckpt)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="does not exist"):
        read_manifest(tmp_path / "nope")

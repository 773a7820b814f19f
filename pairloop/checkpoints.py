"""Reading a Hugging Face checkpoint's tensor manifest (names, shapes, dtypes) without loading it.

The generator checks a new checkpoint against the running one before it touches the engine (a
reload that fails half-way leaves vLLM dead), and the trainer checks what it trained against the
policy before publishing. Both use `compare_checkpoints`. Only safetensors headers are read, so
this is cheap even for a 7B model; a truncated or garbage file fails here, not in the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairloop.errors import ValidationError

__all__ = [
    "COMPLETE_MARKER",
    "CheckpointManifest",
    "TensorInfo",
    "compare_checkpoints",
    "read_manifest",
]

# Written last into a published checkpoint directory; its presence means every file is complete.
COMPLETE_MARKER = "PAIRLOOP_COMPLETE"

_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class CheckpointManifest:
    path: Path
    tensors: dict[str, TensorInfo]
    config: dict[str, Any]

    @property
    def num_parameters(self) -> int:
        total = 0
        for info in self.tensors.values():
            n = 1
            for d in info.shape:
                n *= d
            total += n
        return total


def _weight_files(root: Path) -> list[Path]:
    index = root / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValidationError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = sorted({root / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValidationError(f"checkpoint {root} is missing shard files: {missing}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValidationError(
            f"checkpoint {root} has no *.safetensors file (only safetensors checkpoints are accepted)"
        )
    return files


def read_manifest(path: str | Path) -> CheckpointManifest:
    """Read config.json and every safetensors header under `path`; raise ValidationError if broken."""
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    if not root.is_dir():
        raise ValidationError(f"checkpoint directory {root} does not exist")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ValidationError(f"checkpoint {root} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ValidationError(f"{config_file} is not valid JSON: {exc}") from exc
    tensors: dict[str, TensorInfo] = {}
    for file in _weight_files(root):
        try:
            with safe_open(str(file), framework="np") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    sl = fh.get_slice(name)
                    tensors[name] = TensorInfo(tuple(sl.get_shape()), str(sl.get_dtype()))
        except (SafetensorError, OSError) as exc:
            raise ValidationError(f"{file.name} is not a readable safetensors file: {exc}") from exc
    return CheckpointManifest(path=root, tensors=tensors, config=config)


# config.json fields that must agree for weights to be swappable into a running model.
_ARCH_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "head_dim",
)


def compare_checkpoints(
    expected: CheckpointManifest, actual: CheckpointManifest, *, check_dtype: bool = True
) -> list[str]:
    """Every reason `actual` cannot replace `expected`, as readable sentences (empty: compatible)."""
    problems: list[str] = []
    for field in _ARCH_FIELDS:
        if expected.config.get(field) != actual.config.get(field):
            problems.append(
                f"config.json {field} is {actual.config.get(field)!r}, "
                f"the running model has {expected.config.get(field)!r}"
            )
    missing = sorted(set(expected.tensors) - set(actual.tensors))
    extra = sorted(set(actual.tensors) - set(expected.tensors))
    if missing:
        problems.append(f"{len(missing)} tensors missing, e.g. {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors, e.g. {extra[:5]}")
    for name in sorted(set(expected.tensors) & set(actual.tensors)):
        want, got = expected.tensors[name], actual.tensors[name]
        if want.shape != got.shape:
            problems.append(
                f"tensor {name} has shape {list(got.shape)}, expected {list(want.shape)}"
            )
        elif check_dtype and want.dtype != got.dtype:
            problems.append(f"tensor {name} has dtype {got.dtype}, expected {want.dtype}")
    return problems

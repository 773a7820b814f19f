"""What a checkpoint's `config.json` says about serving it: its context length and its dtype.

The generator (vLLM's context and dtype) and the orchestrator (prompt admission at run creation)
read the same facts here, so both sides agree on what "fits" without talking to each other.
A local directory is read directly; a hub name goes through transformers' `AutoConfig` (cached).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["checkpoint_dtype", "model_context_length", "read_model_config"]

_DTYPES = {"float32", "bfloat16", "float16"}


def read_model_config(model: str) -> dict[str, Any]:
    """The model's config as a dict (the text config for multimodal checkpoints)."""
    path = Path(model).expanduser() / "config.json"
    if path.is_file():
        raw: dict[str, Any] = json.loads(path.read_text())
    else:
        from transformers import AutoConfig

        raw = AutoConfig.from_pretrained(model).to_dict()
    text = raw.get("text_config")
    return {**raw, **text} if isinstance(text, dict) else raw


def model_context_length(model: str) -> int | None:
    """`max_position_embeddings` of the checkpoint (None when it does not say)."""
    value = read_model_config(model).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def checkpoint_dtype(model: str) -> str:
    """The dtype the weights are stored in (`dtype`, or transformers 4's `torch_dtype`).

    Falls back to "auto" when the config names none (or an unusual one): the engine then decides.
    """
    cfg = read_model_config(model)
    for key in ("dtype", "torch_dtype"):
        value = cfg.get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
            return value.removeprefix("torch.")
    return "auto"

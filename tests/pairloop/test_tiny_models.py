"""`pairloop tiny-models`: real HF checkpoints that transformers loads and vLLM's CPU backend accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from orchestrator.cli import main
from pairloop.checkpoints import compare_checkpoints, read_manifest
from pairloop_local.tiny_models import build_tiny_chat_model


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_tiny_model_loads_and_chats(tiny_models: dict[str, Path], arch: str) -> None:
    path = tiny_models[arch]
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == arch
    # vLLM's CPU attention accepts head_dim in {32, 64, 80, ...}; 16 is rejected.
    assert config.head_dim in (32, 64, 80, 96, 112, 128)
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Why is the sky blue?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "Why is the sky blue?" in text and text.startswith(tok.bos_token)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    # The tokenizer round-trips text it was never trained on (byte-level BPE has no unknowns).
    assert tok.decode(tok("zebra-42 ✓", add_special_tokens=False).input_ids) == "zebra-42 ✓"
    model = AutoModelForCausalLM.from_pretrained(path)
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_mistral_template_rejects_non_alternating_roles(tiny_models: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_models["mistral"])
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )


def test_seed_changes_weights_not_shapes_or_tokenizer(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    other = build_tiny_chat_model(tmp_path / "seed1", arch="llama", seed=1)
    base = tiny_models["llama"]
    assert compare_checkpoints(read_manifest(base), read_manifest(other)) == []
    assert (other / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    a = AutoModelForCausalLM.from_pretrained(base).state_dict()
    b = AutoModelForCausalLM.from_pretrained(other).state_dict()
    assert not torch.equal(
        a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"]
    )


def test_cli_builds_both_models(tmp_path: Path) -> None:
    assert main(["tiny-models", str(tmp_path / "m")]) == 0
    for arch in ("llama", "mistral"):
        meta = json.loads((tmp_path / "m" / f"tiny-{arch}" / "pairloop_tiny.json").read_text())
        assert meta["arch"] == arch


def test_cli_rejects_unknown_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiny-models", str(tmp_path), "--preset", "huge"]) == 2
    assert "--preset" in capsys.readouterr().err

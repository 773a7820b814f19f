"""`pairloop tiny-models` writes a tiny PairRM that llm-blender's own loader accepts, with scores
spread over O(1), a sentencepiece tokenizer, and the layout of llm-blender/PairRM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open

from orchestrator.cli import main
from pairloop_local.tiny_ranker import PAIRRM_PREFIX_TOKENS, build_tiny_pairrm


def test_checkpoint_layout(pairrm_dir: Path) -> None:
    config = json.loads((pairrm_dir / "config.json").read_text())
    assert config["ranker_type"] == "pairranker" and config["model_type"] == "deberta"
    assert (config["source_maxlength"], config["candidate_maxlength"]) == (1224, 412)
    backbone = Path(config["model_name"])
    assert (backbone / "spm.model").is_file() and (backbone / "config.json").is_file()
    assert json.loads((backbone / "config.json").read_text())["model_type"] == "deberta-v2"
    with safe_open(pairrm_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        embeddings = f.get_slice("pretrained_model.embeddings.word_embeddings.weight").get_shape()
    assert {"head_layer.1.weight", "head_layer.4.weight"} <= keys
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    # The collator adds PairRM's four prefix tokens at load time; the embeddings have room.
    assert embeddings[0] == len(tokenizer) + len(PAIRRM_PREFIX_TOKENS)
    assert tokenizer.cls_token_id == 1 and tokenizer.sep_token_id == 2  # DeBERTa-v3 ids


def test_llm_blender_loads_it_and_scores_spread_over_order_one(
    reference_blender: Any, items_factory: Any
) -> None:
    prompts, candidates = items_factory(21, 6, 4)
    scores = reference_blender.rank(prompts, candidates, return_scores=True)
    spread = scores.max(axis=1) - scores.min(axis=1)
    assert np.all(spread > 0.05), scores
    assert np.abs(scores).max() < 50


def test_seed_changes_weights_not_tokenizer(tmp_path: Path, pairrm_dir: Path) -> None:
    other = build_tiny_pairrm(tmp_path / "seed1", seed=1)
    spm = "backbone/spm.model"
    assert (other / spm).read_bytes() == (pairrm_dir / spm).read_bytes()
    with (
        safe_open(other / "model.safetensors", "pt") as a,
        safe_open(pairrm_dir / "model.safetensors", "pt") as b,
    ):
        name = "head_layer.1.weight"
        assert a.get_tensor(name).shape == b.get_tensor(name).shape
        assert not np.allclose(a.get_tensor(name).numpy(), b.get_tensor(name).numpy())


def test_rebuilding_in_place_gives_the_same_tokenizer(tmp_path: Path, pairrm_dir: Path) -> None:
    out = build_tiny_pairrm(tmp_path / "again")
    out = build_tiny_pairrm(tmp_path / "again")  # stale tokenizer files must not survive
    same = (out / "backbone/tokenizer.json").read_text()
    assert same == (pairrm_dir / "backbone/tokenizer.json").read_text()


def test_cli_writes_tiny_pairrm(tmp_path: Path) -> None:
    assert main(["tiny-models", str(tmp_path / "m")]) == 0
    meta = json.loads((tmp_path / "m" / "tiny-pairrm" / "pairloop_tiny.json").read_text())
    assert meta == {"arch": "pairrm", "preset": "tiny", "seed": 0}


def test_unknown_preset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preset must be one of"):
        build_tiny_pairrm(tmp_path, preset="huge")


def test_a_relocated_checkpoint_with_a_relative_backbone_loads(
    tmp_path: Path, pairrm_dir: Path, reference_blender: Any, items_factory: Any
) -> None:
    import shutil

    from services.ranker.blender_adapter import load_blender

    moved = tmp_path / "moved"
    shutil.copytree(pairrm_dir, moved)
    config = json.loads((moved / "config.json").read_text())
    config["model_name"] = "backbone"  # relative to the checkpoint, not to the working directory
    (moved / "config.json").write_text(json.dumps(config))
    prompts, candidates = items_factory(22, 2, 3)
    blender = load_blender(str(moved), device="cpu")
    np.testing.assert_allclose(
        blender.rank(prompts, candidates, return_scores=True),
        reference_blender.rank(prompts, candidates, return_scores=True),
        atol=1e-6,
    )


def test_loading_errors_say_what_is_wrong(tmp_path: Path) -> None:
    from services.ranker.blender_adapter import load_blender

    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_blender(str(tmp_path), device="cpu")
    with pytest.raises(FileNotFoundError, match="neither a local directory nor available"):
        load_blender("no-such-org/no-such-pairrm", device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"ranker_type": "deberta-rm"}))
    with pytest.raises(ValueError, match="--backend reward-model"):
        load_blender(str(tmp_path), device="cpu")

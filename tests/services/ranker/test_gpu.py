"""On a CUDA host: the service on the GPU gives llm-blender's numbers there (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest


@pytest.mark.gpu
def test_full_mode_on_cuda_equals_blender_rank_on_cuda(
    pairrm_dir: Path, start_ranker: Any, items_factory: Any, tmp_path: Path
) -> None:
    from services.ranker.blender_adapter import load_blender

    prompts, candidates = items_factory(31, 8, 5)
    blender = load_blender(str(pairrm_dir), device="cuda")
    expected = blender.rank(prompts, candidates, return_scores=True)
    items = [{"prompt": p, "candidates": c} for p, c in zip(prompts, candidates, strict=True)]
    with start_ranker(["--model", str(pairrm_dir), "--device", "cuda"], tmp_path) as url:
        body = httpx.post(f"{url}/v1/rank", json={"items": items}, timeout=120).json()
    got = np.array([r["scores"] for r in body["results"]])
    # TF32 and kernel choice differ with batch shapes on GPUs: a looser bound than on CPU.
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert (got.argmax(1) == expected.argmax(1)).all()

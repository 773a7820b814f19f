"""The streamed save and the shared-reference load, in one process (no ranks): what they write and
build is what the sharded runs publish (tests/services/trainer/test_sharded.py runs them in 2)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pairloop.checkpoints import compare_checkpoints, read_manifest
from services.trainer.loading import load_models
from services.trainer.sharding import parse_shard_size, stream_full_checkpoint


def test_streamed_save_writes_files_of_the_size_given_that_pass_the_swap_check(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    source = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    names = list(read_manifest(source).tensors)
    out = tmp_path / "published"
    stream_full_checkpoint(
        model, out, names=names, dtype=torch.float32, max_shard_size="100KB", write=True
    )
    files = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(files) > 1 and not list(out.glob("*.partial"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(names)
    assert {f.name for f in files} == set(index["weight_map"].values())
    for f in files:  # one tensor may exceed the limit alone; files never hold two that do
        tensors = load_file(str(f))
        assert len(tensors) == 1 or f.stat().st_size <= parse_shard_size("100KB") + 10_000
    # The generator's swap check: names, shapes and dtype of the running (float32) model.
    assert compare_checkpoints(read_manifest(source), read_manifest(out)) == []
    state = model.state_dict()
    for f in files:
        for name, tensor in load_file(str(f)).items():
            assert torch.equal(tensor, state[name])
    # A bf16 policy's checkpoint is cast tensor by tensor (test_sharded: the two-machine run).
    stream_full_checkpoint(
        model,
        tmp_path / "bf16",
        names=names,
        dtype=torch.bfloat16,
        max_shard_size="5GB",
        write=True,
    )
    assert {t.dtype for t in read_manifest(tmp_path / "bf16").tensors.values()} == {"BF16"}
    assert (tmp_path / "bf16" / "model.safetensors").is_file()  # one file: no index


def test_a_reference_equal_to_the_policy_is_a_frozen_copy_not_a_second_read(
    tiny_models: dict[str, Path],
) -> None:
    path = str(tiny_models["llama"])
    models = load_models(path, path, policy_dtype="float32", reference_dtype="bfloat16")
    policy, reference = models.policy, models.reference
    numel = sum(p.numel() for p in policy.parameters())
    assert models.loaded_numel == 2 * numel  # both held by this (single) rank
    ref_state = reference.state_dict()
    for name, tensor in policy.state_dict().items():
        assert ref_state[name].dtype == torch.bfloat16
        assert torch.equal(ref_state[name], tensor.to(torch.bfloat16))
        assert ref_state[name].data_ptr() != tensor.data_ptr()  # a copy: training leaves it
    assert not any(p.requires_grad for p in reference.parameters())
    # Non-persistent buffers (rotary frequencies) are real, as from_pretrained computes them.
    assert not any(b.is_meta for b in reference.buffers())
    # In the policy's dtype the copy computes exactly what the policy does (buffers included).
    same = load_models(path, path, policy_dtype="float32", reference_dtype="float32")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(same.reference(ids).logits, same.policy(ids).logits)

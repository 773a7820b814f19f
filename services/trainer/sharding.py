"""Sharded training (FSDP2 full shard, DeepSpeed ZeRO-3): what differs from one process or DDP.

Used by `dpo.py` inside every rank of `accelerate launch`. The strategy itself is chosen at
launch (`launcher.py` passes the strategy's accelerate config file, whose FSDP / DeepSpeed
settings accelerate turns into its plugin); here are the parts that run inside the ranks:

- `fsdp_on_cpu()`: accelerate 1.15 turns its FSDP plugin on only for GPU-like device types.
  On CPU ranks (`MULTI_CPU`, gloo) it silently keeps plain DDP (accelerate/state.py,
  `AcceleratorState.__init__`: the `distributed_type = FSDP` branch lists MULTI_GPU, MULTI_NPU,
  ... but not MULTI_CPU). torch's FSDP2 itself trains on CPU over gloo, so for the CPU tests and
  benchmarks this applies the same three assignments accelerate makes for a GPU, nothing else:
  every later step (accelerate's `fsdp2_prepare_model`, TRL's `prepare_fsdp` for the reference,
  the Trainer's sharded checkpoint save/load, `get_state_dict`) is the libraries' own code.
- `gather_full_state_dict()`: the published weights, gathered from the shards with every rank
  taking part (accelerate's `get_state_dict`); only rank 0 receives them.
- `rank_reports()`: what each rank holds (DTensor local shapes), peak memory; gathered to rank 0.
"""

from __future__ import annotations

import copy
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pairloop.checkpoints import read_manifest
from pairloop.errors import ServerError
from pairloop.jobs import RankReport

__all__ = [
    "SHARDED",
    "fsdp_on_cpu",
    "gather_full_state_dict",
    "local_numel",
    "rank_reports",
    "write_full_checkpoint",
]

SHARDED = ("fsdp", "deepspeed-zero3")


@contextmanager
def fsdp_on_cpu() -> Iterator[None]:
    """While active, an Accelerator given an FSDP plugin on CPU ranks really uses FSDP."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # What accelerate does for MULTI_GPU & co. (mixed precision is "no" on CPU),
            # including the shared record that every later AcceleratorState() reads back.
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = original


def local_numel(module: Any) -> tuple[int, int, int]:
    """(elements stored on this rank, elements of the whole module, DTensor parameters)."""
    from torch.distributed.tensor import DTensor

    local = total = dtensors = 0
    for param in module.parameters():
        if isinstance(param, DTensor):
            local += param.to_local().numel()
            dtensors += 1
        elif hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3: a partitioned parameter
            local += param.ds_tensor.numel()
            total += param.ds_numel
            continue
        else:
            local += param.numel()
        total += param.numel()
    return local, total, dtensors


def _process_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except OSError:
        return 0
    return pages * resource.getpagesize()


def rank_reports(trainer: Any) -> list[RankReport]:
    """Every rank's report, in rank order, on every rank (a collective: all ranks must call it)."""
    import torch
    import torch.distributed as dist

    state = trainer.accelerator.state
    local, total, dtensors = local_numel(trainer.model)
    ref = getattr(trainer, "ref_model", None)
    report = RankReport(
        rank=state.process_index,
        policy_local_numel=local,
        policy_numel=total,
        sharded_tensors=dtensors,
        reference_local_numel=local_numel(ref)[0] if ref is not None else None,
        # ru_maxrss is in KiB on Linux.
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        rss_bytes=_process_rss_bytes(),
        peak_device_bytes=(
            int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
        ),
    )
    if not (dist.is_available() and dist.is_initialized()):
        return [report]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report.model_dump())  # JSON-able dicts, not pickled models
    return [RankReport.model_validate(r) for r in gathered]


def gather_full_state_dict(trainer: Any, strategy: str) -> dict[str, Any]:
    """The policy's full state dict on rank 0 ({} elsewhere); every rank must call this.

    FSDP2: `torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict,
    cpu_offload)` through accelerate, float32 master weights. ZeRO-3: DeepSpeed's 16-bit
    consolidated state dict (`stage3_gather_16bit_weights_on_model_save`).
    """
    model = trainer.model_wrapped if strategy == "deepspeed-zero3" else trainer.model
    state: dict[str, Any] = trainer.accelerator.get_state_dict(model)
    return state if trainer.args.should_save else {}


def write_full_checkpoint(
    state: dict[str, Any],
    out: Path,
    *,
    model: Any,
    policy_path: str,
    dtype: Any,
    max_shard_size: str,
) -> None:
    """Write a gathered state dict as the policy's checkpoint: its tensor names, `dtype`, shards.

    Not `model.save_pretrained(state_dict=...)`: on a model whose parameters are (resharded)
    DTensors it inspects their freed storage. The tensors are exactly the policy checkpoint's
    (a tied model's state dict names the shared tensor twice; the checkpoint once), written by
    huggingface_hub's sharded safetensors writer (what `save_pretrained` itself uses).
    """
    from huggingface_hub import save_torch_state_dict

    names = list(read_manifest(policy_path).tensors)
    missing = [n for n in names if n not in state]
    if missing:
        raise ServerError(
            f"the gathered weights lack {len(missing)} of the policy's tensors (e.g. {missing[:3]})"
        )
    tensors = {n: state[n].to(dtype).contiguous() for n in names}
    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(tensors, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)

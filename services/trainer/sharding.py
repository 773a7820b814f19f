"""Sharded training (FSDP2 full shard): what differs from one process or DDP.

Used by `dpo.py` inside every rank of `accelerate launch`. The strategy itself is chosen at
launch (`launcher.py` passes the strategy's accelerate config file, whose FSDP settings
accelerate turns into its plugin); here are the parts that run inside the ranks:

- `fsdp_on_cpu()`: accelerate 1.15 turns its FSDP plugin on only for GPU-like device types.
  On CPU ranks (`MULTI_CPU`, gloo) it silently keeps plain DDP (accelerate/state.py,
  `AcceleratorState.__init__`: the `distributed_type = FSDP` branch lists MULTI_GPU, MULTI_NPU,
  ... but not MULTI_CPU). torch's FSDP2 itself trains on CPU over gloo, so for the CPU tests and
  benchmarks this applies the same three assignments accelerate makes for a GPU, nothing else:
  every later step (accelerate's `fsdp2_prepare_model`, the reference's sharding below, the
  Trainer's sharded checkpoint save/load) is the libraries' own code.
- `reference_sharded_per_layer()`: TRL's `prepare_fsdp` shards the reference with one
  `fully_shard` on the root, so every reference forward gathers the whole model, and it never
  broadcasts rank 0's weights (ranks that loaded nothing would keep empty parameters). While
  active, the reference goes through accelerate's `fsdp2_prepare_model` instead, as the policy
  does: one FSDP unit per decoder layer, filled from rank 0 one parameter at a time.
- `stream_full_checkpoint()`: the published weights, gathered one tensor at a time with every
  rank taking part, cast to the published dtype and written by rank 0 shard by shard: no rank
  holds more than one safetensors file's worth of them (never a full float32 copy).
- `rank_reports()`: what each rank holds (DTensor local shapes), peak memory; gathered to rank 0.
- `return_freed_memory_to_the_os()`: CPU ranks only, glibc's heap would keep what FSDP frees.
"""

from __future__ import annotations

import copy
import json
import re
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pairloop.atomic import atomic_write_text
from pairloop.errors import ServerError
from pairloop.jobs import RankReport

__all__ = [
    "SHARDED",
    "fsdp_on_cpu",
    "fsdp_units",
    "local_numel",
    "parse_shard_size",
    "rank_reports",
    "reference_sharded_per_layer",
    "return_freed_memory_to_the_os",
    "stream_full_checkpoint",
]

SHARDED = ("fsdp",)
_SIZE = re.compile(r"^(\d+)(KB|MB|GB)$")
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}  # decimal, as huggingface_hub reads "5GB"
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_MMAP_THRESHOLD_BYTES = 1 << 20


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


def return_freed_memory_to_the_os() -> None:
    """On CPU ranks: serve allocations of 1 MiB and more by mmap, so freeing them unmaps them.

    FSDP allocates and frees each unit's gathered parameters and gradients many times a step.
    glibc raises its mmap threshold to the largest block freed (up to 32 MiB), after which
    those blocks come from the heap, whose freed memory stays resident: measured on 2 CPU ranks
    with the 77M model, 3.1-3.35 GiB peak RSS per rank against 1.50 GiB with a fixed 1 MiB
    threshold (bench/trainer_memory.py). A fixed threshold also stops the adjustment
    (`mallopt(M_MMAP_THRESHOLD)`, what MALLOC_MMAP_THRESHOLD_ sets at start-up). No-op off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        return  # not glibc: its allocator does not keep freed heap memory this way


@contextmanager
def reference_sharded_per_layer() -> Iterator[None]:
    """While active (around the DPOTrainer's construction), TRL shards the reference per layer.

    Two names in TRL's dpo_trainer module are replaced for the duration, nothing else:
    `prepare_fsdp` (FSDP2: accelerate's `fsdp2_prepare_model`, the policy's own sharding and
    broadcast, on the frozen reference; FSDP1 keeps TRL's) and `hash_module`, which reads every
    tensor for the precomputed log-probs' cache key and cannot read a rank's empty reference
    (TRL broadcasts rank 0's key to all ranks, so the others' never mattered).
    """
    import trl.trainer.dpo_trainer as dpo_trainer
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    original_prepare, original_hash = dpo_trainer.prepare_fsdp, dpo_trainer.hash_module

    def prepare(model: Any, accelerator: Any) -> Any:
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            return original_prepare(model, accelerator)
        model.requires_grad_(False)  # frozen; and prepare upcasts trainable bf16 to float32
        model = fsdp2_prepare_model(accelerator, model)
        # accelerate keeps the head and the root gathered after forward, for the backward that
        # follows at once; the reference has no backward: every unit is freed after its use.
        model.set_reshard_after_forward(True)
        model.eval()
        return model

    def hash_module(module: Any) -> str:
        if any(p.is_meta for p in module.parameters()):
            return "not loaded on this rank"
        return str(original_hash(module))

    dpo_trainer.prepare_fsdp, dpo_trainer.hash_module = prepare, hash_module
    try:
        yield
    finally:
        dpo_trainer.prepare_fsdp, dpo_trainer.hash_module = original_prepare, original_hash


def local_numel(module: Any) -> tuple[int, int, int]:
    """(elements stored on this rank, elements of the whole module, DTensor parameters)."""
    from torch.distributed.tensor import DTensor

    local = total = dtensors = 0
    for param in module.parameters():
        if isinstance(param, DTensor):
            local += param.to_local().numel()
            dtensors += 1
        else:
            local += param.numel()
        total += param.numel()
    return local, total, dtensors


def fsdp_units(module: Any) -> int:
    """FSDP2 units in `module` (itself included): each is all-gathered on its own."""
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) for m in module.modules())


def _process_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except OSError:
        return 0
    return pages * resource.getpagesize()


def rank_reports(trainer: Any, *, loaded_numel: int | None = None) -> list[RankReport]:
    """Every rank's report, in rank order, on every rank (a collective: all ranks must call it).

    `loaded_numel`: the parameter elements this rank materialised when it loaded the models.
    """
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
        reference_fsdp_units=fsdp_units(ref) if ref is not None else None,
        loaded_numel=loaded_numel,
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


def parse_shard_size(size: str) -> int:
    """Bytes of a `max_shard_size` such as "5GB" (decimal units, as huggingface_hub's)."""
    match = _SIZE.match(size)
    if match is None:
        raise ValueError(f"max_shard_size {size!r} is not a number followed by KB, MB or GB")
    return int(match.group(1)) * _UNITS[match.group(2)]


class _ShardWriter:
    """Writes tensors to safetensors files of at most `max_bytes` each, as they come."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.current: dict[str, Any] = {}
        self.current_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: Any) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self._flush()
        self.current[name] = tensor
        self.current_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f".shard-{len(self.files)}.partial"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def close(self) -> None:
        """Name the files as `save_pretrained` does, with an index when there are several."""
        if self.current or not self.files:
            self._flush()
        count = len(self.files)
        if count == 1:
            self.files[0][0].rename(self.out / "model.safetensors")
            return
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        atomic_write_text(
            self.out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n"
        )


def stream_full_checkpoint(
    model: Any,
    out: Path,
    *,
    names: list[str],
    dtype: Any,
    max_shard_size: str,
    write: bool,
) -> None:
    """Write `model`'s tensors `names` (the policy checkpoint's) in `dtype`; a collective.

    Every rank calls this with the same `names`: each sharded tensor is all-gathered in turn
    (`DTensor.full_tensor()`), cast, and kept only by the writing rank (`write`), which writes a
    safetensors file whenever `max_shard_size` is reached. Peak host memory on the writer: one
    file's worth of `dtype` tensors plus one gathered tensor; on the others: one tensor.
    """
    import torch
    from torch.distributed.tensor import DTensor

    state = model.state_dict()  # the parameters themselves (sharded), not copies
    missing = [n for n in names if n not in state]
    if missing:
        raise ServerError(
            f"the trained model lacks {len(missing)} of the policy's tensors (e.g. {missing[:3]})"
        )
    writer = _ShardWriter(out, parse_shard_size(max_shard_size)) if write else None
    if writer is not None:
        out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for name in names:
            tensor = state[name]
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            if writer is not None:
                writer.add(name, full.detach().to(device="cpu", dtype=dtype).contiguous())
            del full
    if writer is None:
        return
    writer.close()
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)

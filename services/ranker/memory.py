"""How much memory a forward pass may take, and what a pass of `rows` x `length` will take.

Token caps alone (rows x longest) do not bound a transformer encoder's memory: DeBERTa's attention
in transformers is eager and materialises [rows x heads, L, L] tensors (the scores, the
content->position and position->content terms, their sum, the softmax), so a pass grows with L^2.
At PairRM's shape (DeBERTa-v3-large: 16 heads, hidden 1024) and its longest rows (1224 + 2 x 412 =
2048 tokens) one row needs ~0.7 GB in bfloat16 by this estimate: the compose default of 128 rows
would need ~94 GB, next to a vLLM holding most of the GPU.

    cost = PassCost.from_model_config(model.config, dtype_bytes=2)
    budget = MemoryBudget(cost, device="cuda:0", fraction=0.8, cap_bytes=None)
    budget.bytes()        # what the next pass may use: a share of the free memory, capped

The estimate is deliberately simple (and a little generous); a CUDA out-of-memory is still caught
by the batcher, which splits the pass in halves and retries (and lowers the budget to what then
worked), so an estimate that is off costs time, never a failed request. The lowered budget is not
forever: an out-of-memory is often transient (a neighbour's peak), so after `recover_after` passes
in a row that fit, the limit doubles, until the free-memory reading bounds the passes again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.ranker.settings import RankerSettings

__all__ = ["MemoryBudget", "PassCost", "cuda_free_bytes", "is_out_of_memory", "memory_budget"]

log = logging.getLogger(__name__)

# [rows x heads, L, L] tensors alive at once in one DeBERTa attention layer (scores, c2p, p2c,
# their sum, the softmax output); other encoders have fewer, so this errs on the safe side.
ATTENTION_COPIES = 5
# Per-token activations alive at once, in units of the hidden size: input and output states,
# q/k/v, the attention context, the 4x FFN intermediate and its activation.
ACTIVATION_WIDTHS = 16


@dataclass(frozen=True)
class PassCost:
    """Estimated peak activation bytes of one forward pass (weights not included)."""

    heads: int
    hidden: int
    dtype_bytes: int

    @classmethod
    def from_model_config(cls, config: Any, *, dtype_bytes: int) -> PassCost:
        return cls(
            heads=int(config.num_attention_heads),
            hidden=int(config.hidden_size),
            dtype_bytes=dtype_bytes,
        )

    def pass_bytes(self, rows: int, length: int) -> int:
        attention = ATTENTION_COPIES * self.heads * length * length
        activations = ACTIVATION_WIDTHS * self.hidden * length
        return rows * (attention + activations) * self.dtype_bytes

    def max_rows(self, length: int, budget: int) -> int:
        """Most rows of `length` tokens a pass may hold within `budget` bytes (at least 1)."""
        return max(1, budget // self.pass_bytes(1, length))


def cuda_free_bytes(device: str) -> int:
    """Memory a pass can still get on a CUDA device: the driver's free memory plus what torch's
    caching allocator holds reserved but unused (it reuses that before asking the driver)."""
    import torch

    dev = torch.device(device)
    free, _total = torch.cuda.mem_get_info(dev)
    cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return int(free + max(0, cached))


# How device out-of-memory reads when it is not raised as torch.OutOfMemoryError: the caching
# allocator's message, a CUDA runtime error from a kernel or a stream, cuBLAS/cuDNN failing to
# allocate their workspace, and the MPS, HIP and XPU backends' own wording.
_OOM_MESSAGES = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cusolver_status_alloc_failed",
    "cufft_alloc_failed",
    "hipblas_status_alloc_failed",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for device out-of-memory in any of the forms torch raises it: `torch.OutOfMemoryError`
    (CUDA's caching allocator, MPS), or a RuntimeError whose message says so ("CUDA error: out of
    memory", "CUBLAS_STATUS_ALLOC_FAILED", ...), also as the cause of another error."""
    try:
        import torch
    except ImportError:  # a backend without torch cannot run out of device memory
        return False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.OutOfMemoryError):
            return True
        if isinstance(current, RuntimeError):
            text = str(current).casefold()
            if any(m in text for m in _OOM_MESSAGES):
                return True
        current = current.__cause__ or current.__context__
    return False


class MemoryBudget:
    """Bytes the next forward pass may take: `fraction` of the device's free memory (CUDA), at
    most `cap_bytes`, and at most what the last out-of-memory left working.

    `free_bytes` reads the device (default: `cuda_free_bytes` on CUDA, nothing elsewhere); it is
    read at every planning step, so a neighbour (vLLM) taking or giving back memory is seen.
    """

    def __init__(
        self,
        cost: PassCost,
        *,
        device: str,
        fraction: float,
        cap_bytes: int | None,
        free_bytes: Callable[[], int] | None = None,
        recover_after: int = 16,
    ) -> None:
        self.cost = cost
        self.fraction = fraction
        self.cap_bytes = cap_bytes
        self.recover_after = recover_after
        self._fits = 0  # passes in a row that fitted since the last out-of-memory or recovery
        if free_bytes is None and device.startswith("cuda"):
            free_bytes = lambda: cuda_free_bytes(device)  # noqa: E731
        self._free_bytes = free_bytes
        self.after_oom: int | None = None

    def _other_limits(self) -> list[int]:
        limits = [] if self.cap_bytes is None else [self.cap_bytes]
        if self._free_bytes is not None:
            limits.append(int(self.fraction * self._free_bytes()))
        return limits

    def bytes(self) -> int | None:
        """The budget now; None when nothing bounds it (CPU without a cap)."""
        limits = self._other_limits() + ([] if self.after_oom is None else [self.after_oom])
        return min(limits) if limits else None

    def note_fit(self) -> None:
        """A pass fitted. After `recover_after` in a row, the out-of-memory limit doubles; once it
        is no tighter than the cap and the free memory, it is dropped (they bound passes again)."""
        if self.after_oom is None:
            return
        self._fits += 1
        if self._fits < self.recover_after:
            return
        self._fits = 0
        self.after_oom *= 2
        others = self._other_limits()
        if others and self.after_oom >= min(others):
            self.after_oom = None
            log.info("%d passes fitted: the out-of-memory limit is lifted", self.recover_after)
        else:
            log.info("passes fitted: now planned within %.2f GB", self.after_oom / 1e9)

    def note_out_of_memory(self, rows: int, length: int) -> None:
        """A pass of `rows` x `length` ran out of memory: plan no more than half of it again."""
        self._fits = 0
        half = self.cost.pass_bytes(max(1, rows // 2), length)
        if self.after_oom is None or half < self.after_oom:
            self.after_oom = half
            log.warning(
                "out of memory at %d rows x %d tokens: forward passes now planned within %.2f GB",
                rows,
                length,
                half / 1e9,
            )


def memory_budget(settings: RankerSettings, model_config: Any) -> MemoryBudget:
    """The forward-pass budget of a transformer backend (`model_config`: its HF config)."""
    return MemoryBudget(
        PassCost.from_model_config(
            model_config, dtype_bytes=4 if settings.dtype == "float32" else 2
        ),
        device=settings.device,
        fraction=settings.batch_memory_fraction,
        cap_bytes=settings.max_batch_bytes,
    )

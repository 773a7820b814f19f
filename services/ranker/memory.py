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
worked), so an estimate that is off costs time, never a failed request.
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


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's out-of-memory error (CUDA's, and MPS's), whatever raised it."""
    try:
        import torch
    except ImportError:  # a backend without torch cannot run out of device memory
        return False
    return isinstance(exc, torch.OutOfMemoryError)


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
    ) -> None:
        self.cost = cost
        self.fraction = fraction
        self.cap_bytes = cap_bytes
        if free_bytes is None and device.startswith("cuda"):
            free_bytes = lambda: cuda_free_bytes(device)  # noqa: E731
        self._free_bytes = free_bytes
        self.after_oom: int | None = None

    def bytes(self) -> int | None:
        """The budget now; None when nothing bounds it (CPU without a cap)."""
        limits = [x for x in (self.cap_bytes, self.after_oom) if x is not None]
        if self._free_bytes is not None:
            limits.append(int(self.fraction * self._free_bytes()))
        return min(limits) if limits else None

    def note_out_of_memory(self, rows: int, length: int) -> None:
        """A pass of `rows` x `length` ran out of memory: plan no more than half of it again."""
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

"""Settings of the ranker service: every flag is also a `PAIRLOOP_RANKER_*` environment variable.

    python -m services.ranker --model llm-blender/PairRM --port 8001
    PAIRLOOP_RANKER_MODEL=/models/tiny-pairrm PAIRLOOP_RANKER_BATCH_WAIT_MS=5 python -m services.ranker

Flags win over environment variables, which win over the defaults below.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings

from pairloop.settings import service_config

__all__ = ["ALL_CUDA", "Dtype", "RankerSettings"]

Dtype = Literal["float32", "bfloat16", "float16"]

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
# The `devices` value meaning every CUDA device the process sees (CUDA_VISIBLE_DEVICES, or the
# GPUs Kubernetes/compose gave the container), resolved when the replicas load.
ALL_CUDA = "cuda:all"


class RankerSettings(BaseSettings):
    """How the ranker service loads its model, batches work and guards its inputs."""

    model_config = service_config("PAIRLOOP_RANKER_", "python -m services.ranker")

    model: str = Field(
        "llm-blender/PairRM",
        description="checkpoint directory or hub name; for --backend scorer, the scoring "
        "function as package.module:function",
    )
    backend: str = Field(
        "pairrm",
        description="pairrm | reward-model | scorer, or package.module:factory for your own",
    )
    host: str = Field("127.0.0.1", description="interface to listen on")
    instance_id: str | None = Field(
        None,
        max_length=128,
        description="a nonce from the launcher, echoed by /health with the pid (proves the answer "
        "is this process's)",
    )
    port: int = Field(8001, ge=1, le=65535)
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:N or mps")
    # One model replica per device, each with its own batcher, inference thread and memory
    # budget; requests go to the least-loaded replica. One process keeps one address and one
    # /ready for the orchestrator, whatever the node's GPU count.
    devices: str | None = Field(
        None,
        description="one replica per device, comma-separated (cuda:0,cuda:1; cpu,cpu) or "
        f"{ALL_CUDA} for every visible CUDA device; replaces --device when set",
    )
    dtype: Dtype = Field(
        "float32", description="weights' dtype; bfloat16 halves memory and time on GPUs"
    )
    cache_dir: str | None = Field(None, description="Hugging Face cache for hub names")

    max_items: int = Field(256, ge=1, description="most items in one request")
    max_candidates: int = Field(
        32, ge=2, description="most candidates per item (best-of-16 is the recipe's best)"
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body")

    # Dynamic batching: pair comparisons (or scored candidates) from concurrent requests are
    # collected for up to batch_wait_ms, sorted by length and cut into forward passes.
    batch_size: int = Field(32, ge=1, description="most sequences in one forward pass")
    # CPU-sized default: ~27 rows of PairRM's typical 600 tokens. On a GPU raise both (e.g.
    # --batch-size 128 --max-batch-tokens 262144): the cap is what bounds activation memory.
    max_batch_tokens: int = Field(
        16384, ge=1, description="most padded tokens (rows x longest) in one forward pass"
    )
    # Attention's memory grows with rows x L^2: the token cap above does not bound it. On CUDA a
    # pass is also planned within a share of the device's free memory (read before each plan).
    batch_memory_fraction: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="share of the device's free memory one forward pass may plan for (CUDA)",
    )
    max_batch_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="cap of a forward pass's estimated activation memory in bytes, attention's "
        "[rows x heads, L, L] included (default: none on CPU; on CUDA the free-memory share)",
    )
    batch_wait_ms: float = Field(
        2.0,
        ge=0.0,
        description="how long the collector waits for more work before a partial batch runs",
    )
    sort_window: int = Field(
        2048, ge=1, description="queued sequences sorted by length together (length bucketing)"
    )

    source_max_length: int | None = Field(
        None, ge=8, description="prompt tokens kept; default: the checkpoint's (PairRM: 1224)"
    )
    candidate_max_length: int | None = Field(
        None, ge=8, description="candidate tokens kept; default: the checkpoint's (PairRM: 412)"
    )
    reward_input_format: Literal["auto", "chat", "pair"] = Field(
        "auto",
        description="reward-model backend: chat template (auto when the tokenizer has one) "
        "or a (prompt, candidate) text pair",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {v!r}")
        return v

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: str | None) -> str | None:
        if v is None:
            return None
        names = [d.strip() for d in v.split(",")]
        if names == [ALL_CUDA]:
            return ALL_CUDA
        bad = [d for d in names if not _DEVICE.match(d)]
        if bad:
            raise ValueError(
                f"devices must be a comma-separated list of cpu, cuda, cuda:N or mps, or "
                f"{ALL_CUDA}; {', '.join(repr(d) for d in bad)} is not a device"
            )
        accelerators = [d for d in names if d != "cpu"]  # cpu,cpu: two replicas on the host
        if len(set(accelerators)) != len(accelerators) or (
            "cuda" in accelerators and any(d.startswith("cuda:") for d in accelerators)
        ):
            raise ValueError(
                f"devices {v!r} names one accelerator twice: one replica per GPU (each plans "
                "its passes within that GPU's free memory)"
            )
        return ",".join(names)

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("log level must be DEBUG, INFO, WARNING or ERROR")
        return v.upper()

    @model_validator(mode="after")
    def _consistent(self) -> RankerSettings:
        if self.devices is not None and "device" in self.model_fields_set:
            raise ValueError("set --device (one replica) or --devices (one per device), not both")
        if self.dtype == "float16" and "cpu" in self.replica_devices():
            raise ValueError("float16 is not supported on cpu; use float32 or bfloat16")
        return self

    def replica_devices(self, cuda_count: int | None = None) -> list[str]:
        """The device of each replica: `devices` split, or the one `device`. `cuda:all` becomes
        cuda:0..cuda:N-1 given `cuda_count` (the replicas' loader reads it from torch), and stays
        as is without it."""
        if self.devices is None:
            return [self.device]
        if self.devices == ALL_CUDA and cuda_count is not None:
            return [f"cuda:{i}" for i in range(cuda_count)]
        return self.devices.split(",")

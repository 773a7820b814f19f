"""Settings of the generator service: every flag is also a `PAIRLOOP_GENERATOR_*` environment variable.

    python -m services.generator --model DIR_OR_HF_NAME --port 8000 --model-root DIR --admin-token T
    PAIRLOOP_GENERATOR_MODEL=... PAIRLOOP_GENERATOR_PORT=8000 python -m services.generator

Defaults are chosen so that those four flags alone start the service on a laptop CPU: eager mode,
an explicit KV cache size (vLLM on CPU cannot size it itself). The context is the model's own
(`max_position_embeddings`; Mistral-7B-Instruct-v0.2: 32768) unless `--max-model-len` caps it: on a
CPU the KV cache must hold one whole context, so cap it there (2 GiB holds 16k Mistral tokens).
On a GPU host, set `--kv-cache-bytes 0` (vLLM sizes the cache from `--gpu-memory-utilization`) and
`--no-enforce-eager` (CUDA graphs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

from pairloop.settings import service_config

__all__ = ["DEFAULT_MODEL", "GeneratorSettings", "ReleaseMode", "SwapMode"]

DEFAULT_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"

SwapMode = Literal["wait", "abort"]
ReleaseMode = Literal["auto", "sleep", "shutdown"]


class GeneratorSettings(BaseSettings):
    """The vLLM generator service: model, engine sizing, request caps, weight swaps, serving."""

    model_config = service_config("PAIRLOOP_GENERATOR_", "python -m services.generator")

    # --- model and engine -------------------------------------------------------------------
    model: str = Field(
        DEFAULT_MODEL, description="Hugging Face model name or local checkpoint directory"
    )
    served_model_name: str | None = Field(
        None, description="name clients pass as `model` and see in /v1/models (default: --model)"
    )
    initial_version: str = Field(
        "base",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$",
        description="weight version label of the weights the service starts with",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weight and activation dtype (auto: the checkpoint's own, float32 included; "
        "vLLM's auto would serve a float32 checkpoint in bfloat16)",
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="cap of the context length (prompt + completion); default: the model's own",
    )
    # 2 GiB holds 16k tokens of Mistral-7B's KV cache in bf16: enough for a handful of long
    # requests on a laptop. vLLM's CPU backend refuses to guess, so the default is explicit.
    kv_cache_bytes: int = Field(
        2 << 30,
        ge=0,
        description="KV cache size in bytes; 0 lets vLLM size it from --gpu-memory-utilization (GPU)",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="GPU memory fraction for vLLM (used when kv-cache-bytes=0)"
    )
    enforce_eager: bool = Field(True, description="eager mode (required on CPU; GPU: CUDA graphs)")
    prefix_caching: bool = Field(
        True, description="reuse KV cache blocks of shared prompt prefixes"
    )
    max_num_seqs: int | None = Field(
        None, ge=1, description="most sequences decoded in one engine step (default: vLLM's)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica")
    data_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM engines behind this one server, one per GPU group (GPUs = this x "
        "tensor_parallel_size): requests are balanced over them, and a swap, release or wake "
        "reaches every engine (vLLM sends utility calls to each)",
    )
    cpu_threads: int = Field(
        0,
        ge=0,
        description="OpenMP threads of the CPU backend (0: as many as vLLM chooses); 1 is fastest "
        "for tiny models",
    )
    seed: int = Field(0, description="engine seed (requests without a seed draw from it)")
    engine_log_stats: bool = Field(False, description="vLLM's periodic throughput log lines")

    # --- request caps -----------------------------------------------------------------------
    max_n: int = Field(16, ge=1, description="largest `n` (samples per prompt) a request may ask")
    max_tokens_limit: int = Field(4096, ge=1, description="largest `max_tokens` a request may ask")
    default_max_tokens: int = Field(
        256, ge=1, description="`max_tokens` when a request does not say (capped by the context)"
    )
    max_batch_prompts: int = Field(
        1024, ge=1, description="most prompts in one completions or batch request"
    )
    max_body_bytes: int = Field(
        16 << 20, ge=1024, description="largest request body in bytes (413 above it)"
    )

    # --- weight swaps -----------------------------------------------------------------------
    model_root: Path | None = Field(
        None,
        description="model store root: /admin/weights only loads checkpoints inside it "
        "(unset: swaps are disabled)",
    )
    admin_token: SecretStr | None = Field(
        None, description="bearer token of the admin routes (unset: admin routes answer 503)"
    )
    swap_mode: SwapMode = Field(
        "wait",
        description="in-flight requests at a swap: wait (finish on the old weights) or abort "
        "(stopped, then re-run on the new weights)",
    )
    swap_drain_timeout_s: float = Field(
        600.0,
        gt=0.0,
        description="how long a swap waits for in-flight requests before giving up (nothing changes)",
    )

    # --- time-shared placement (POST /admin/release, /admin/wake) ---------------------------
    release_mode: ReleaseMode = Field(
        "auto",
        description="how /admin/release frees the engine's memory: sleep (vLLM sleep mode level "
        "2: GPU memory freed, the process stays; CUDA/ROCm/XPU only), shutdown (the engine's "
        "processes end; a wake builds it again), auto: sleep where vLLM supports it, else shutdown",
    )
    release_retry_after_s: int = Field(
        60,
        ge=1,
        description="Retry-After (seconds) sent with the 503 of requests that arrive while released",
    )

    # --- serving ----------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in a container)")
    instance_id: str | None = Field(
        None,
        max_length=128,
        description="a nonce from the launcher, echoed by /health with the pid (proves the answer "
        "is this process's)",
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO")
    access_log: bool = Field(True, description="one log line per HTTP request")

    @model_validator(mode="after")
    def _check(self) -> GeneratorSettings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must not exceed "
                f"max_tokens_limit ({self.max_tokens_limit})"
            )
        looks_local = self.model.startswith(("/", "./", "../", "~")) or Path(self.model).exists()
        if looks_local and not Path(self.model).expanduser().is_dir():
            raise ValueError(
                f"model {self.model!r} looks like a local path but is not a directory; "
                "give a checkpoint directory or a Hugging Face model name"
            )
        if self.model_root is not None and not self.model_root.is_dir():
            raise ValueError(f"model_root {str(self.model_root)!r} is not a directory")
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 8:
            raise ValueError("admin_token must be at least 8 characters")
        return self

    @property
    def model_name(self) -> str:
        """The name clients use for this model."""
        return self.served_model_name or self.model

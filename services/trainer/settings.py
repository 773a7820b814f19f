"""Settings of the DPO trainer worker: environment variables `PAIRLOOP_TRAINER_*` (or flags of
`python -m services.trainer`), plus the shared `PAIRLOOP_REDIS_URL`.

    PAIRLOOP_TRAINER_MODEL_STORE_ROOT=/models PAIRLOOP_REDIS_URL=redis://redis:6379/0 \\
        celery -A services.trainer.celery_app worker --pool prefork --concurrency 1 ...
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings

from pairloop.jobs import TRAIN_QUEUE, Strategy
from pairloop.settings import RedisSettings, service_config
from pairloop.train_client import DEFAULT_VISIBILITY_TIMEOUT

__all__ = ["ACCELERATE_CONFIGS", "TrainerSettings"]

_CONFIGS = Path(__file__).with_name("accelerate")
# The accelerate config file each strategy launches with (`accelerate_config` replaces it).
ACCELERATE_CONFIGS: dict[str, Path] = {
    "ddp": _CONFIGS / "multi_gpu.yaml",
    "fsdp": _CONFIGS / "fsdp.yaml",
}


def _this_host_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _shared_redis_url() -> str:
    return RedisSettings().redis_url


class TrainerSettings(BaseSettings):
    """Everything the worker needs that does not come with the job."""

    model_config = service_config("PAIRLOOP_TRAINER_", "python -m services.trainer")

    model_store_root: Path = Field(
        Path("models"),
        description="every path in a job must resolve inside this directory (shared volume)",
    )
    work_root: Path | None = Field(
        None,
        description="trainer checkpoints and caches, one directory per job id; default "
        "MODEL_STORE_ROOT/.pairloop-trainer",
    )
    redis_url: str = Field(
        default_factory=_shared_redis_url,
        description="Celery broker and result backend (default: PAIRLOOP_REDIS_URL)",
    )
    queue: str = Field(TRAIN_QUEUE, description="the Celery queue this worker consumes")
    soft_time_limit: int = Field(
        24 * 3600,
        ge=1,
        description="seconds before a job is asked to stop (its checkpoints are kept for resume)",
    )
    hard_time_limit: int = Field(
        24 * 3600 + 600, ge=1, description="seconds before the job's process is killed"
    )
    visibility_timeout: int = Field(
        DEFAULT_VISIBILITY_TIMEOUT,
        ge=1,
        description="seconds before Redis redelivers an unacknowledged job; must exceed the hard "
        "time limit, or a running job is handed to a second worker",
    )
    max_tasks_per_child: int = Field(
        1,
        ge=0,
        description="jobs per worker child process before it is replaced (0: unlimited); 1 frees "
        "all memory and accelerate state between jobs",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when a device is visible, else CPU"
    )
    launcher: Literal["auto", "in-process", "accelerate"] = Field(
        "auto",
        description="auto: `accelerate launch` when more than one CUDA device is visible, else "
        "train in the worker's process",
    )
    num_processes: int | None = Field(
        None,
        ge=1,
        description="training processes on this machine (default: its visible CUDA devices)",
    )
    strategy: Strategy = Field(
        "fsdp",
        description="multi-process strategy when the job does not name one: fsdp (FSDP2 full "
        "shard; fits a 7B full-parameter DPO on 8 x 80 GB) or ddp (every rank "
        "holds everything; small models only)",
    )
    num_machines: int = Field(
        1, ge=1, description="machines taking part in one training job (torchrun nnodes)"
    )
    machine_rank: int = Field(
        0,
        ge=0,
        description="this machine's rank; 0 runs the Celery worker that publishes, the others "
        "join with `python -m services.trainer.join JOB_ID`",
    )
    rendezvous_endpoint: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9.\[\]:-]+:\d{1,5}$",
        description="HOST:PORT of the c10d rendezvous every machine meets at (machine 0's "
        "address); required when num_machines > 1, default a free loopback port",
    )
    advertise_address: str = Field(
        default_factory=_this_host_address,
        pattern=r"^[A-Za-z0-9.\[\]:-]+$",
        description="the address other trainer machines reach this one at, when it leads a "
        "multi-machine job (dpo.num_machines > 1); default this host's address. On Kubernetes: "
        "the pod's stable DNS name",
    )
    rendezvous_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="port of the rendezvous a leading worker hosts; 0: a free port per attempt",
    )
    arrival_timeout_s: float = Field(
        600.0,
        gt=0,
        description="seconds a multi-machine job's leader waits for every other machine to "
        "arrive (a trainer worker to take its share) before it fails the attempt",
    )
    machine_attempts: int = Field(
        3,
        ge=1,
        description="attempts of a multi-machine job (a machine missing or lost fails one); each "
        "retry resumes from the last sharded checkpoint",
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per training process on CPU (default: torch's, one per "
        "core); set it when the host's cores are shared, where idle OpenMP threads spin",
    )
    accelerate_config: Path | None = Field(
        None,
        description="accelerate config file for multi-process training (default: the "
        "strategy's, services/trainer/accelerate/{multi_gpu,fsdp}.yaml)",
    )
    publish_max_shard_size: str = Field(
        "5GB",
        pattern=r"^\d+(KB|MB|GB)$",
        description="largest safetensors file of a published checkpoint (as the Hub's models)",
    )
    save_total_limit: int = Field(
        2, ge=1, description="trainer checkpoints kept per job (the newest ones)"
    )
    keep_checkpoints: bool = Field(
        False, description="keep the job's trainer checkpoints after publishing (default: delete)"
    )
    max_worker_losses: int = Field(
        3,
        ge=1,
        description="a job whose worker process is lost this many times in a row (OOM kill, "
        "segfault, a killed pod) fails with the reason instead of being redelivered forever",
    )
    result_retry_s: int = Field(
        120,
        ge=1,
        description="seconds one progress or result write retries through a Redis outage; "
        "training never waits on it (progress is buffered, the result is kept on disk)",
    )
    heartbeat_file: Path = Field(
        Path(tempfile.gettempdir()) / "pairloop-trainer.heartbeat",
        description="file the worker process touches while it runs (the liveness probe reads "
        "its age, so a Redis outage never gets a busy worker restarted)",
    )
    heartbeat_interval_s: float = Field(
        10.0, gt=0, description="seconds between touches of heartbeat_file"
    )
    heartbeat_max_age_s: float = Field(
        120.0,
        gt=0,
        description="`python -m services.trainer.liveness` fails when heartbeat_file is older",
    )
    log_level: str = Field("INFO", description="worker log level")
    hostname: str = Field(
        "trainer@%h",
        description="the worker's Celery node name; unique per worker sharing one Redis "
        "(control commands such as ping address it)",
    )

    @model_validator(mode="after")
    def _limits(self) -> TrainerSettings:
        if self.soft_time_limit >= self.hard_time_limit:
            raise ValueError("soft_time_limit must be smaller than hard_time_limit")
        if self.machine_rank >= self.num_machines:
            raise ValueError(
                f"machine_rank {self.machine_rank} must be below num_machines {self.num_machines}"
            )
        if self.num_machines > 1 and self.rendezvous_endpoint is None:
            raise ValueError(
                "num_machines > 1 needs rendezvous_endpoint (HOST:PORT of machine 0, reachable "
                "from every machine)"
            )
        if self.visibility_timeout <= self.hard_time_limit:
            raise ValueError(
                "visibility_timeout must be longer than hard_time_limit, or Redis hands a running "
                "job to a second worker"
            )
        return self

    def accelerate_config_for(self, strategy: str) -> Path:
        """The accelerate config file a launch with `strategy` uses."""
        return self.accelerate_config or ACCELERATE_CONFIGS[strategy]

    @property
    def store_root(self) -> Path:
        return self.model_store_root.resolve()

    @property
    def jobs_root(self) -> Path:
        """Where each job's work directory (trainer checkpoints, logs) lives."""
        return (self.work_root or self.store_root / ".pairloop-trainer").resolve()

    @property
    def datasets_cache(self) -> Path:
        """`datasets` cache, on the shared volume so precomputed reference log-probs survive."""
        return self.jobs_root / "hf-datasets-cache"

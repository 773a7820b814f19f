"""The training job contract: what the orchestrator sends to the Celery task `train_dpo`, and what
it gets back. JSON on the wire (Celery's JSON serializer), validated with pydantic at both ends.

Defaults are the alignment-handbook Zephyr DPO recipe (`zephyr-7b-beta/dpo/config_full.yaml`):
beta 0.01, lr 5e-7, 1 epoch, batch 8 x grad-accum 2, max_length 1024, max_prompt_length 512,
warmup 0.1, cosine, adamw_torch, bf16, gradient checkpointing, seed 42. `bf16` and
`gradient_checkpointing` default to "auto": on where a CUDA device exists, off on CPU, where
both are slower or unsupported.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "TRAIN_TASK_NAME",
    "DPOHyperparameters",
    "LoraSettings",
    "TrainJob",
    "TrainProgress",
    "TrainResult",
]

# Celery task name: the orchestrator sends by name and never imports the trainer.
TRAIN_TASK_NAME = "pairloop.train_dpo"


class DPOHyperparameters(BaseModel):
    """DPO knobs, named as in TRL's `DPOConfig`; any of them may be overridden by the run config."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.01, gt=0.0)
    loss_type: str = "sigmoid"
    learning_rate: float = Field(5e-7, gt=0.0)
    num_train_epochs: float = Field(1.0, gt=0.0)
    max_steps: int = Field(-1, description="-1: derived from epochs")
    per_device_train_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(2, ge=1)
    max_length: int = Field(1024, ge=8)
    max_prompt_length: int = Field(512, ge=4)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    lr_scheduler_type: str = "cosine"
    optim: str = "adamw_torch"
    bf16: bool | Literal["auto"] = "auto"
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    seed: int = 42
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(
        50, ge=1, description="trainer checkpoint interval: resume point after a crash"
    )
    precompute_ref_log_probs: bool = False

    @model_validator(mode="after")
    def _lengths(self) -> DPOHyperparameters:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self


class LoraSettings(BaseModel):
    """Optional LoRA: trained as an adapter, then merged so the generator can swap full weights."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainJob(BaseModel):
    """One DPO training job. Paths are inside the model store root (the trainer refuses others)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    iteration: int = Field(ge=1)
    policy_path: str = Field(min_length=1, description="weights to start from")
    reference_path: str = Field(min_length=1, description="frozen reference model for the DPO loss")
    dataset_path: str = Field(
        min_length=1,
        description="a directory `datasets.load_dataset` reads (Snorkel columns), or a hub dataset name",
    )
    split: str | None = Field(None, description="default: train_iteration_{iteration}")
    output_path: str = Field(min_length=1, description="where the new full weights are published")
    hyperparameters: DPOHyperparameters = Field(default_factory=DPOHyperparameters)
    lora: LoraSettings | None = None

    @property
    def split_name(self) -> str:
        return self.split or f"train_iteration_{self.iteration}"

    @property
    def job_id(self) -> str:
        """Stable id: the same run and iteration is the same job (idempotent resubmission)."""
        return f"{self.run_id}-iter{self.iteration}"


class TrainProgress(BaseModel):
    """Task state meta while training (`AsyncResult.info` when state is PROGRESS)."""

    phase: Literal["loading", "training", "saving", "validating", "publishing"]
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    rewards_margins: float | None = None
    rewards_accuracies: float | None = None
    epoch: float | None = None
    resumed_from_step: int = 0


class TrainResult(BaseModel):
    """The task's return value."""

    job_id: str
    checkpoint_path: str
    metrics: dict[str, float]
    seconds: float
    steps: int
    resumed_from_step: int = 0
    reused: bool = Field(False, description="true when a finished job was submitted again")

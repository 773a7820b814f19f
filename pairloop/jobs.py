"""The training job contract: what the orchestrator sends to the Celery task `train_dpo`, and what
it gets back. JSON on the wire (Celery's JSON serializer), validated with pydantic at both ends.

Defaults are the alignment-handbook Zephyr DPO recipe (`zephyr-7b-beta/dpo/config_full.yaml`):
beta 0.01, lr 5e-7, 1 epoch, batch 8 x grad-accum 2, max_length 1024, max_prompt_length 512,
warmup 0.1, cosine, adamw_torch, bf16, gradient checkpointing, seed 42. `bf16` and
`gradient_checkpointing` default to "auto": on where a CUDA device exists, off on CPU, where
both are slower or unsupported.

The orchestrator sends a job by task name (`TRAIN_TASK_NAME`) to `TRAIN_QUEUE` with the job id as
the Celery task id (`pairloop.train_client.submit_train_job` does exactly that), and never imports
the trainer.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pairloop.errors import ServerError
from pairloop.losses import PAIRLOOP_LOSSES, check_loss_types

__all__ = [
    "TRAIN_QUEUE",
    "TRAIN_RANK_TASK_NAME",
    "TRAIN_TASK_NAME",
    "DPOHyperparameters",
    "JobCrashLoopError",
    "LoraSettings",
    "RankReport",
    "Strategy",
    "TrainJob",
    "TrainProgress",
    "TrainResult",
    "describe_world",
]

# Celery task name: the orchestrator sends by name and never imports the trainer.
TRAIN_TASK_NAME = "pairloop.train_dpo"
# The queue trainer workers consume (`celery ... worker -Q`); clients send training jobs there.
TRAIN_QUEUE = "pairloop.trainer"
# One machine's share of a multi-machine job (`dpo.num_machines` > 1): the leader, the worker that
# took the job, sends it to the same queue for every other machine (services/trainer/fanout.py).
TRAIN_RANK_TASK_NAME = "pairloop.train_dpo_rank"


class JobCrashLoopError(ServerError):
    """A training job lost its worker process `max_worker_losses` times in a row (an OOM kill, a
    segfault, a killed pod) and is not delivered again; the message names each worker and signal.

    Here, beside the job schema, so that a client that reads the failure resolves its type.
    """


# How several training processes split the work. ddp: every rank holds the whole policy, its
# gradients, AdamW's moments and the reference (about 18 bytes per parameter with a bf16
# reference). fsdp (FSDP2 full shard): all four are sharded over the ranks. DeepSpeed ZeRO-3 is
# not offered: nothing tests it on CPU ranks, and its partitioned init needs the models loaded
# after the Trainer's config is built (fsdp covers the same memory with rank-0 loading).
Strategy = Literal["ddp", "fsdp"]


Tracker = Literal["tensorboard", "wandb"]


def _default_trackers() -> list[Tracker]:
    # TensorBoard by default: event files under the run directory, readable offline.
    return ["tensorboard"]


class DPOHyperparameters(BaseModel):
    """DPO knobs, named as in TRL's `DPOConfig`; any of them may be overridden by the run config."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.01, gt=0.0)
    loss_type: list[str] = Field(
        default_factory=lambda: ["sigmoid"],
        description="one loss name or a list (summed with loss_weights): TRL's DPOConfig names "
        "(sigmoid, ipo, hinge, ...) or simpo / sppo (pairloop.losses)",
    )
    loss_weights: list[float] | None = Field(
        None, description="one weight per loss_type entry; None: 1.0 each (TRL's rule)"
    )
    ld_alpha: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="LD-DPO: weight of the tokens past the shorter response's length; None: off",
    )
    use_weighting: bool = Field(False, description="WPO weighting of the pairs (TRL)")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="robust / exo_pair / aot: label noise (TRL)"
    )
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = (
        "reverse_kl"
    )
    discopop_tau: float = Field(0.05, gt=0.0, description="discopop's temperature (TRL)")
    simpo_gamma: float = Field(
        0.5,
        ge=0.0,
        description="SimPO's target reward margin gamma (the loss is -log sigmoid(beta * "
        "(mean logp_w - mean logp_l) - gamma)); SimPO's Mistral-Instruct: beta 2.5, gamma 0.25",
    )
    learning_rate: float = Field(5e-7, gt=0.0)
    num_train_epochs: float = Field(1.0, gt=0.0)
    max_steps: int = Field(-1, description="-1: derived from epochs")
    per_device_train_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(
        2, ge=1, description="ignored when global_batch_size is set (then it is derived)"
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="pairs per optimizer step over all ranks (Zephyr: 128). When set, "
        "gradient_accumulation_steps = global_batch_size / (ranks x per_device_train_batch_size), "
        "which must divide exactly, so the recipe keeps its batch on any GPU count",
    )
    strategy: Strategy | None = Field(
        None,
        description="multi-process strategy: ddp or fsdp (FSDP2 full shard); "
        "None: the trainer worker's PAIRLOOP_TRAINER_STRATEGY (default fsdp). One process is "
        "never sharded",
    )
    num_machines: int = Field(
        1,
        ge=1,
        le=64,
        description="trainer machines this job trains on, as one world: the worker that takes it "
        "leads and the system hands every other machine's share to another trainer worker",
    )
    cpu_offload: bool = Field(
        False,
        description="fsdp: keep the parameter, gradient and optimizer shards in "
        "host memory (slower steps, far less GPU memory)",
    )
    max_length: int = Field(1024, ge=8)
    max_prompt_length: int = Field(512, ge=4)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    lr_scheduler_type: str = "cosine"
    optim: str = "adamw_torch"
    bf16: bool | Literal["auto"] = "auto"
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="dtype the policy is loaded and trained in (mixed precision comes from bf16); "
        "auto: the checkpoint's own. Published weights are cast back to the policy's dtype.",
    )
    seed: int = 42
    logging_steps: int = Field(1, ge=1)
    report_to: list[Tracker] = Field(
        default_factory=_default_trackers,
        description="experiment trackers, as TRL's report_to: tensorboard (event files under "
        "the run directory, offline), wandb (needs `wandb` installed and WANDB_* set on the "
        'trainer); "none" or [] for no tracking',
    )
    save_steps: int = Field(
        50, ge=1, description="trainer checkpoint interval: resume point after a crash"
    )
    precompute_ref_log_probs: bool = Field(
        False,
        description="one reference forward pass over the dataset before training, then the "
        "reference model is freed: less memory and no reference forward in the step",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> Any:
        # TRL's spellings: a string or a list, "none" for nothing.
        if value is None or value == "none" or value == ["none"]:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("loss_type", mode="before")
    @classmethod
    def _loss_names(cls, v: object) -> object:
        names = [v] if isinstance(v, str) else v
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return check_loss_types(names)
        return names

    @model_validator(mode="after")
    def _losses(self) -> DPOHyperparameters:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} entries for {len(self.loss_type)} "
                f"loss_type entries {self.loss_type}: give one weight per loss"
            )
        ours = [n for n in self.loss_type if n in PAIRLOOP_LOSSES]
        if ours:
            # simpo/sppo read the policy's plain summed log-probs (SimPO averages them itself).
            knobs = {
                "ld_alpha": self.ld_alpha is not None,
                "use_weighting": self.use_weighting,
                "f_divergence_type": self.f_divergence_type != "reverse_kl",
            }
            clash = [k for k, on in knobs.items() if on]
            if clash:
                raise ValueError(
                    f"{', '.join(clash)} apply to TRL's losses only, not to {', '.join(ours)}; "
                    "unset them or choose a TRL loss_type"
                )
        return self

    @model_validator(mode="after")
    def _lengths(self) -> DPOHyperparameters:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        if (
            self.global_batch_size is not None
            and self.global_batch_size % self.per_device_train_batch_size
        ):
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of "
                f"per_device_train_batch_size {self.per_device_train_batch_size}"
            )
        return self

    def loss_settings(self) -> dict[str, Any]:
        """The loss and the knobs that shape it (defaults that do nothing left out): what a run
        records, and `pairloop compare` shows, beside its figures."""
        out: dict[str, Any] = {"loss_type": "+".join(self.loss_type), "beta": self.beta}
        if self.loss_weights is not None:
            out["loss_weights"] = list(self.loss_weights)
        if "simpo" in self.loss_type:
            out["simpo_gamma"] = self.simpo_gamma
        if "discopop" in self.loss_type:
            out["discopop_tau"] = self.discopop_tau
        if self.ld_alpha is not None:
            out["ld_alpha"] = self.ld_alpha
        if self.use_weighting:
            out["use_weighting"] = True
        if self.label_smoothing:
            out["label_smoothing"] = self.label_smoothing
        if self.f_divergence_type != "reverse_kl":
            out["f_divergence_type"] = self.f_divergence_type
        return out

    def gradient_accumulation_for(self, world_size: int) -> int:
        """Accumulation steps that keep `global_batch_size` on `world_size` ranks (else as set)."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_step = world_size * self.per_device_train_batch_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of {world_size} "
                f"ranks x per_device_train_batch_size {self.per_device_train_batch_size} = "
                f"{per_step}; change per_device_train_batch_size, the number of GPUs or "
                "global_batch_size"
            )
        return self.global_batch_size // per_step


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
        description="a directory inside the model store that `datasets.load_dataset` reads "
        "(Snorkel columns, or TRL's conversational prompt/chosen/rejected)",
    )
    split: str | None = Field(None, description="default: train_iteration_{iteration}")
    output_path: str = Field(min_length=1, description="where the new full weights are published")
    eval_split: str | None = Field(
        None,
        description="a split of the dataset evaluated after training (eval loss, reward "
        "accuracy and margin, as TRL's evaluate); None: no evaluation",
    )
    logging_dir: str | None = Field(
        None,
        description="where TensorBoard event files go, inside the model store; None: the job's "
        "work directory on the trainer",
    )
    hyperparameters: DPOHyperparameters = Field(default_factory=DPOHyperparameters)
    lora: LoraSettings | None = None

    @property
    def split_name(self) -> str:
        return self.split or f"train_iteration_{self.iteration}"

    @property
    def job_id(self) -> str:
        """Stable id: the same run and iteration is the same job (idempotent resubmission)."""
        return f"{self.run_id}-iter{self.iteration}"

    def fingerprint(self) -> str:
        """Hash of everything that shapes the result: a resubmission must match it to be reused."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


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
    checkpoint_step: int = Field(
        0, description="step of the last complete trainer checkpoint: where a crash resumes from"
    )
    machines: int = Field(1, ge=1, description="trainer machines training this job")
    world_size: int = Field(1, ge=1, description="training processes over all machines")


def describe_world(machines: int, world_size: int) -> str:
    """How a job trains, for one progress line: "2 machines x 8 ranks"."""
    per = max(world_size // max(machines, 1), 1)
    return f"{machines} machine{'s' * (machines != 1)} x {per} rank{'s' * (per != 1)}"


class RankReport(BaseModel):
    """What one training rank held: the proof (and the measure) of sharding, and its peak memory."""

    rank: int
    policy_local_numel: int = Field(description="policy parameter elements in this rank's memory")
    policy_numel: int = Field(description="elements of the whole policy")
    sharded_tensors: int = Field(description="policy parameters held as DTensor shards (FSDP2)")
    reference_local_numel: int | None = Field(
        None, description="reference elements in this rank's memory; None: no reference model"
    )
    reference_fsdp_units: int | None = Field(
        None,
        description="FSDP units the reference is sharded into (one per decoder layer, the "
        "embeddings, the head and the root); each forward gathers one at a time",
    )
    loaded_numel: int | None = Field(
        None,
        description="parameter elements this rank materialised when loading policy and "
        "reference (0 on the ranks that receive their shards by broadcast)",
    )
    peak_rss_bytes: int = Field(description="the rank process's peak resident memory")
    rss_bytes: int = Field(description="its resident memory at the end of training")
    peak_device_bytes: int | None = Field(
        None, description="torch.cuda.max_memory_allocated on a GPU"
    )


class TrainResult(BaseModel):
    """The task's return value."""

    job_id: str
    checkpoint_path: str
    metrics: dict[str, float]
    seconds: float
    steps: int
    resumed_from_step: int = 0
    reused: bool = Field(False, description="true when a finished job was submitted again")
    adapter_path: str | None = Field(
        None, description="the LoRA adapter, beside the merged weights"
    )
    started_at: float | None = Field(None, description="unix time the worker started the task")
    timings: dict[str, float] = Field(
        default_factory=dict,
        description="seconds per phase: load, train, save, validate, publish (and total)",
    )
    strategy: str = Field("single-process", description="what ran: single-process, ddp or fsdp")
    world_size: int = Field(1, ge=1, description="training processes over all machines")
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = Field(
        None, description="as used: derived from global_batch_size when that is set"
    )
    global_batch_size: int | None = Field(
        None, description="pairs per optimizer step: world x per-device batch x accumulation"
    )
    ranks: list[RankReport] = Field(
        default_factory=list, description="per training rank: what it held, its peak memory"
    )

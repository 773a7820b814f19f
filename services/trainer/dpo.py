"""The one module that drives TRL: DPO training of a policy against an explicit reference.

`train_policy(spec, report)` loads the models, trains with `DPOTrainer` (resuming from the job's
last complete trainer checkpoint), and writes the new full weights (LoRA merged, the adapter
beside them) into `spec.staging_dir`. Publishing is the caller's business (`publishing.py`).
It runs in the worker's process, or in every rank of `accelerate launch` (`launch_entry.py`).

TRL 1.16 notes kept here so that churn stays in one place: `processing_class=` (no
`tokenizer=`); `bf16`/`gradient_checkpointing` default to True, wrong on CPU; with
`ref_model=None` TRL reloads the reference from `config._name_or_path`, so we always pass the
reference we mean; `max_prompt_length` is gone from `DPOConfig`, so prompts are truncated here.

Sharded strategies (`sharding.py`): the strategy comes from the launch (accelerate config), so
`DPOConfig` only learns the derived gradient accumulation and, under FSDP, leaves activation
checkpointing to FSDP's own (the launcher sets `fsdp_activation_checkpointing`; the Trainer refuses
both at once). Only rank 0 reads the weights (`loading.py`); the reference is sharded per decoder
layer like the policy (`sharding.reference_sharded_per_layer`) unless its log-probs are
precomputed, and the final save streams the gathered tensors, every rank taking part.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pairloop.atomic import atomic_write_text
from pairloop.checkpoints import COMPLETE_MARKER, read_manifest
from pairloop.errors import ServerError, ValidationError
from pairloop.jobs import DPOHyperparameters, TrainProgress
from pairloop.losses import needs_reference, needs_win_probabilities
from services.trainer.data import require_win_probabilities
from services.trainer.loading import load_models
from services.trainer.sharding import (
    SHARDED,
    rank_reports,
    reference_sharded_per_layer,
    stream_full_checkpoint,
)
from services.trainer.spec import (
    TrainingOutcome,
    TrainingSpec,
    last_complete_checkpoint,
    prepare_dataset,
    prepare_eval_dataset,
)

__all__ = [
    "ADAPTER_DIR",
    "HANDLED_OUTSIDE_DPOCONFIG",
    "checkpoint_dtype",
    "dpo_config",
    "dpo_config_kwargs",
    "dpo_trainer_class",
    "progress_callback",
    "resolve_precision",
    "train_policy",
]

log = logging.getLogger(__name__)

ProgressReport = Callable[[TrainProgress], None]
ADAPTER_DIR = "adapter"
# Metrics of the last logged step that the result carries (TRL's names).
_STEP_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "learning_rate",
    "loss/simpo",
    "loss/sppo",
)
_TRAINER_STATE = "trainer_state.json"  # transformers' name for it in every checkpoint
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _is_final(checkpoint: Path) -> bool:
    """True when `checkpoint` was saved at the run's last step."""
    state = json.loads((checkpoint / _TRAINER_STATE).read_text())
    return bool(state.get("max_steps")) and state["global_step"] >= state["max_steps"]


def resolve_precision(hp: DPOHyperparameters, device: str) -> tuple[bool, bool]:
    """(bf16 compute, gradient checkpointing) for `hp` on `device`, "auto" resolved."""
    import torch

    on_cuda = device == "cuda"
    bf16 = hp.bf16 if hp.bf16 != "auto" else on_cuda and torch.cuda.is_bf16_supported()
    checkpointing = hp.gradient_checkpointing if hp.gradient_checkpointing != "auto" else on_cuda
    if bf16 and not on_cuda:
        raise ValidationError(
            'hyperparameters.bf16 is true but the trainer runs on CPU; use "auto" or false',
            param="hyperparameters.bf16",
        )
    return bool(bf16), bool(checkpointing)


# DPOHyperparameters fields that are not DPOConfig fields, and where each one takes effect.
# Every other field goes to DPOConfig under its own name (or its `_DPOCONFIG_NAMES` name):
# tests/services/trainer/test_dpo_config.py fails for a field in neither place.
HANDLED_OUTSIDE_DPOCONFIG: dict[str, str] = {
    "max_prompt_length": "PairloopDPOTrainer.max_prompt_length, set in train_policy "
    "(TRL 1.x dropped it from DPOConfig)",
    "dtype": "the dtype train_policy loads the policy and the reference in (_load_causal_lm)",
    "global_batch_size": "derives DPOConfig.gradient_accumulation_steps from the world size "
    "(dpo_config)",
    "strategy": "the launch: the strategy's accelerate config file (launcher.py)",
    "cpu_offload": "the launch: fsdp_offload_params (launcher.py)",
    "num_machines": "the launch: the leader fans the job out over machines (fanout.py)",
    "simpo_gamma": "PairloopLossesMixin.simpo_gamma, set in train_policy (services/trainer/losses.py)",
}
# transformers 5: `warmup_ratio` is gone; a float below 1 in `warmup_steps` is the ratio.
_DPOCONFIG_NAMES = {"warmup_ratio": "warmup_steps"}


def dpo_config_kwargs(
    hp: DPOHyperparameters, *, bf16: bool, gradient_checkpointing: bool
) -> dict[str, Any]:
    """DPOConfig's keyword arguments for `hp`: all its fields but HANDLED_OUTSIDE_DPOCONFIG.

    Built from `hp.model_dump()`, so a new hyperparameter reaches DPOConfig without an edit here
    (and DPOConfig refuses one it does not know). `bf16`/`gradient_checkpointing` are `hp`'s
    values with "auto" resolved for the device (`resolve_precision`).
    """
    kwargs = {
        _DPOCONFIG_NAMES.get(name, name): value
        for name, value in hp.model_dump(exclude=set(HANDLED_OUTSIDE_DPOCONFIG)).items()
    }
    kwargs["loss_type"] = list(hp.loss_type)  # simpo/sppo are taken out by PairloopLossesMixin
    if not needs_reference(hp.loss_type):
        # Reference-free: TRL loads no reference, and the mixin's "precomputed" log-probs are 0.
        kwargs["precompute_ref_log_probs"] = True
    kwargs["bf16"] = bf16
    kwargs["gradient_checkpointing"] = gradient_checkpointing
    return kwargs


def dpo_config(spec: TrainingSpec) -> Any:
    """TRL's DPOConfig for the job: its hyperparameters plus what the trainer decides itself."""
    from trl import DPOConfig

    hp = spec.job.hyperparameters
    # bf16 is compute only: weights load in hp.dtype (float32 by default) and stay the master
    # copy that AdamW updates, with float32 moments. Pure bf16 weights cannot train this recipe:
    # bf16 keeps 8 significant bits, so near a weight of 0.01 its spacing is ~6e-5, and an
    # update of lr 5e-7 x O(1) rounds away to nothing.
    bf16, checkpointing = resolve_precision(hp, spec.device)
    sharded: dict[str, Any] = {}
    if spec.strategy == "fsdp":
        # FSDP's own activation checkpointing (set at launch) replaces the Trainer's, which
        # would all-gather every layer's shards a second time in the backward pass.
        checkpointing = False
        # Reduce-scatter the gradients after every accumulation micro-batch (overlapped with
        # the backward) so they stay sharded: accelerate's default `no_sync` keeps the whole
        # model's unsharded gradients between micro-batches (+13.5 GiB per GPU at 7B in bf16).
        sharded["accelerator_config"] = {"gradient_accumulation_kwargs": {"sync_each_batch": True}}
    kwargs = dpo_config_kwargs(hp, bf16=bf16, gradient_checkpointing=checkpointing)
    try:
        kwargs["gradient_accumulation_steps"] = hp.gradient_accumulation_for(spec.world_size)
    except ValueError as exc:
        raise ValidationError(str(exc), param="hyperparameters.global_batch_size") from None
    return DPOConfig(
        **kwargs,
        **sharded,
        output_dir=spec.checkpoints_dir,
        save_strategy="steps",
        save_total_limit=spec.save_total_limit,
        use_cpu=spec.device == "cpu",
        # Every parameter of a causal LM gets a gradient; the search for unused ones costs a pass.
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
    )


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def checkpoint_dtype(path: str) -> str:
    """The dtype most of a checkpoint's floating tensors are stored in."""
    counts: dict[str, int] = {}
    for info in read_manifest(path).tensors.values():
        name = _SAFETENSORS_DTYPES.get(info.dtype)
        if name:
            counts[name] = counts.get(name, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else "float32"


def dpo_trainer_class() -> type[Any]:
    from trl import DPOTrainer

    from pairloop.truncation import keep_end  # the rule prompt admission cuts by, too
    from services.trainer.losses import PairloopLossesMixin

    class PairloopDPOTrainer(PairloopLossesMixin, DPOTrainer):
        """DPOTrainer that also caps prompt length, as `max_prompt_length` did before TRL 1.x,
        and knows the losses simpo and sppo (`services/trainer/losses.py`).

        Long prompts keep their end (the question), as TRL's old default did, so the
        completions are not crowded out of `max_length`.
        """

        max_prompt_length: int | None = None

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            cap = self.max_prompt_length
            if cap is None:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            # TRL drops rows whose prompt fills max_length; truncate the prompt first instead,
            # so a long question costs its beginning, not the whole pair.
            max_length, args.max_length = args.max_length, None
            try:
                dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            finally:
                args.max_length = max_length
            return dataset.map(
                lambda ex: {"prompt_ids": keep_end(ex["prompt_ids"], cap)},
                desc=f"Truncating {dataset_name} prompts to {cap} tokens",
            )

    return PairloopDPOTrainer


def progress_callback(report: ProgressReport, resumed_from_step: int) -> Any:
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Forwards step, metrics and the last complete checkpoint to `report` (rank 0 only)."""

        def __init__(self) -> None:
            self.progress = TrainProgress(phase="training", resumed_from_step=resumed_from_step)

        def _emit(self, state: Any, **changes: Any) -> None:
            if not state.is_world_process_zero:
                return
            self.progress = self.progress.model_copy(
                update={"step": state.global_step, "total_steps": state.max_steps, **changes}
            )
            report(self.progress)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._emit(state, checkpoint_step=resumed_from_step)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            logs = logs or {}
            if "loss" not in logs:
                return
            if state.is_world_process_zero:
                log.info(
                    "step %d/%d loss %.4f margin %s accuracy %s",
                    state.global_step,
                    state.max_steps,
                    logs["loss"],
                    logs.get("rewards/margins"),
                    logs.get("rewards/accuracies"),
                )
            self._emit(
                state,
                loss=logs.get("loss"),
                rewards_margins=logs.get("rewards/margins"),
                rewards_accuracies=logs.get("rewards/accuracies"),
                epoch=logs.get("epoch"),
            )

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # Called after the checkpoint's files are all written: only now is it a resume point.
            # Every rank writes its own files (its shard, its RNG state): wait for all of them.
            from accelerate import PartialState

            PartialState().wait_for_everyone()
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                atomic_write_text(folder / COMPLETE_MARKER, f"{state.global_step}\n")
            self._emit(state, checkpoint_step=state.global_step)

    return ProgressCallback()


def _last_step_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    for entry in reversed(log_history):
        if "loss" in entry:
            return {k: float(entry[k]) for k in _STEP_METRICS if k in entry}
    return {}


def _mean_step_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """`mean/<name>` over every logged training step: the job's average beside its last step."""
    steps = [e for e in log_history if "loss" in e]
    return {
        f"mean/{k}": sum(float(e[k]) for e in steps if k in e) / n
        for k in ("loss", "rewards/margins", "rewards/accuracies")
        if (n := sum(1 for e in steps if k in e))
    }


def tensorboard_callback(logging_dir: str) -> Any:
    """transformers' TensorBoardCallback writing to `logging_dir` (rank 0 only, on its first log).

    Its directory otherwise comes from an environment variable or the trainer's output_dir (the
    job's work directory, off the run): here it is the run's own folder, readable offline.
    """
    from transformers.integrations import TensorBoardCallback

    class RunTensorBoardCallback(TensorBoardCallback):
        """Keeps its writer open past the end of training, for the evaluation that follows.

        The base class closes it there and opens a new one on the next log: a file of the same
        name (the time to the second), which replaces the training steps' file.
        """

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.tb_writer is not None:
                self.tb_writer.flush()

        def close(self) -> None:
            if self.tb_writer is not None:
                self.tb_writer.close()
                self.tb_writer = None

    callback = RunTensorBoardCallback()
    callback.logging_dir = logging_dir
    return callback


def _save_weights(trainer: Any, tokenizer: Any, spec: TrainingSpec, policy_dtype: str) -> bool:
    """Write full weights (and the LoRA adapter, if any) into the staging directory.

    Called on every rank: under a sharded strategy gathering the weights is a collective.
    """
    staging = Path(spec.staging_dir)
    if spec.strategy in SHARDED:
        # The generator validates names and dtype against the running model: the policy
        # checkpoint's tensors, in its dtype, gathered and written one tensor at a time.
        stream_full_checkpoint(
            trainer.accelerator.unwrap_model(trainer.model),
            staging,
            names=list(read_manifest(spec.policy_path).tensors),
            dtype=_torch_dtype(policy_dtype),
            max_shard_size=spec.publish_max_shard_size,
            write=trainer.args.should_save,
        )
        if trainer.args.should_save:
            tokenizer.save_pretrained(staging)
            trainer.state.save_to_json(str(staging / _TRAINER_STATE))
        return False
    if not trainer.args.should_save:
        return False
    staging.mkdir(parents=True, exist_ok=True)
    # The whole step history (loss, rewards, learning rate) travels with the weights it made.
    trainer.state.save_to_json(str(staging / _TRAINER_STATE))
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter_saved = False
    if spec.job.lora is not None:
        model.save_pretrained(staging / ADAPTER_DIR, safe_serialization=True)
        tokenizer.save_pretrained(staging / ADAPTER_DIR)
        model = model.merge_and_unload()
        adapter_saved = True
    # The generator validates dtype against the running model: publish in the policy's dtype.
    model = model.to(_torch_dtype(policy_dtype))
    model.save_pretrained(
        staging, safe_serialization=True, max_shard_size=spec.publish_max_shard_size
    )
    tokenizer.save_pretrained(staging)
    return adapter_saved


def train_policy(
    spec: TrainingSpec, report: ProgressReport, dataset: Any = None
) -> TrainingOutcome:
    """Train `spec.job` and write the new weights to `spec.staging_dir` (on rank 0)."""
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, TrainerState

    started = time.monotonic()
    job, hp = spec.job, spec.job.hyperparameters
    if spec.device == "cpu" and spec.cpu_threads:
        import torch

        torch.set_num_threads(spec.cpu_threads)
    report(TrainProgress(phase="loading"))
    train_dataset = dataset if dataset is not None else prepare_dataset(spec)
    if needs_win_probabilities(hp.loss_type):
        require_win_probabilities(train_dataset, split=job.split_name)
    eval_dataset = prepare_eval_dataset(spec)

    tokenizer = AutoTokenizer.from_pretrained(spec.policy_path)
    if not getattr(tokenizer, "chat_template", None):
        raise ValidationError(
            f"the policy's tokenizer at {spec.policy_path!r} has no chat template; DPO on "
            "conversational pairs needs one (set tokenizer.chat_template and save it)",
            param="policy_path",
        )
    policy_dtype = checkpoint_dtype(spec.policy_path)
    load_dtype = policy_dtype if hp.dtype == "auto" else hp.dtype
    if job.lora is not None and spec.strategy in SHARDED:
        raise ValidationError(
            f"LoRA with strategy {spec.strategy} is not supported: a LoRA policy's trainable "
            "weights are small, train it with strategy ddp (hyperparameters.strategy)",
            param="hyperparameters.strategy",
        )
    # With LoRA and the reference equal to the policy, TRL gets the reference for free by
    # disabling the adapter; otherwise the reference is an explicit model (a copy of the loaded
    # policy when it is the same checkpoint). Under FSDP only rank 0 reads the weights.
    same_reference = Path(spec.reference_path) == Path(spec.policy_path)
    # The reference is frozen: with bf16 compute it needs no float32 copy (half the memory).
    ref_dtype = "bfloat16" if resolve_precision(hp, spec.device)[0] else load_dtype
    # Reference-free losses (simpo) load none; a LoRA policy's reference is its adapter-free base.
    skip_reference = not needs_reference(hp.loss_type) or (job.lora is not None and same_reference)
    models = load_models(
        spec.policy_path,
        None if skip_reference else spec.reference_path,
        policy_dtype=load_dtype,
        reference_dtype=ref_dtype,
    )
    policy, ref_model = models.policy, models.reference

    peft_config = None
    if job.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=job.lora.r,
            lora_alpha=job.lora.alpha,
            lora_dropout=job.lora.dropout,
            target_modules=job.lora.target_modules,
            task_type="CAUSAL_LM",
        )

    resume = last_complete_checkpoint(Path(spec.checkpoints_dir))
    resumed_from_step = resume[1] if resume else 0
    callback = progress_callback(report, resumed_from_step)
    trainer_cls = dpo_trainer_class()
    trainer_cls.max_prompt_length = hp.max_prompt_length
    trainer_cls.simpo_gamma = hp.simpo_gamma
    with reference_sharded_per_layer():
        trainer = trainer_cls(
            model=policy,
            ref_model=ref_model,
            args=dpo_config(spec),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[callback],
        )
    # Our callback logs each step; the default printer would dump dicts on stdout.
    trainer.remove_callback(PrinterCallback)
    tensorboard = None
    if "tensorboard" in hp.report_to:
        # report_to's own TensorBoard callback writes under output_dir (the job's work directory
        # on the trainer): replaced by one writing where the job says (the run's folder).
        from transformers.integrations import TensorBoardCallback

        trainer.remove_callback(TensorBoardCallback)
        tensorboard = tensorboard_callback(spec.logging_dir or spec.checkpoints_dir)
        trainer.add_callback(tensorboard)
    if hp.precompute_ref_log_probs and ref_model is not None:
        # Reference log-probs are now columns of the dataset: the model is no longer needed.
        trainer.ref_model = models.reference = None
        del ref_model
        gc.collect()
    loaded = time.monotonic()

    train_metrics: dict[str, Any] = {}
    if resume and _is_final(resume[0]):
        # Crashed after the last checkpoint, before publishing. `Trainer.train` would run one
        # step past max_steps here (it checks the limit only after a step): load it instead.
        log.info("job %s: checkpoint %s is the final one, publishing it", job.job_id, resume[0])
        if spec.strategy == "fsdp":
            # The shards load into a sharded model: wrap it as `train` would have. accelerate's
            # FSDP2 path prepares a model only with its optimizer (AdamW's state stays unbuilt).
            trainer.create_optimizer()
            trainer.model, trainer.optimizer = trainer.accelerator.prepare(
                trainer.model, trainer.optimizer
            )
            trainer.model_wrapped = trainer.model
        trainer._load_from_checkpoint(str(resume[0]))
        trainer.state = TrainerState.load_from_json(str(resume[0] / _TRAINER_STATE))
    else:
        if resume:
            log.info("job %s resumes from %s", job.job_id, resume[0])
        output = trainer.train(resume_from_checkpoint=str(resume[0]) if resume else None)
        train_metrics = output.metrics
    trained = time.monotonic()

    metrics = _last_step_metrics(trainer.state.log_history)
    metrics.update(_mean_step_metrics(trainer.state.log_history))
    if eval_dataset is not None:
        # TRL's evaluate on the held-out pairs: eval_loss, eval_rewards/accuracies, .../margins.
        evaluated = trainer.evaluate()
        metrics.update({k: float(v) for k, v in evaluated.items() if isinstance(v, (int, float))})
    if tensorboard is not None:
        tensorboard.close()
    for key in ("train_loss", "train_runtime", "train_samples_per_second", "epoch"):
        if key in train_metrics:
            metrics[key] = float(train_metrics[key])
    loss = metrics.get("loss", metrics.get("train_loss", 0.0))
    if not math.isfinite(loss):
        raise ServerError(
            f"training diverged (loss {loss}); nothing was published. Lower "
            "hyperparameters.learning_rate or raise beta, then submit the job again"
        )

    report(
        callback.progress.model_copy(
            update={
                "phase": "saving",
                "step": trainer.state.global_step,
                "total_steps": trainer.state.max_steps,
            }
        )
    )
    ranks = rank_reports(trainer, loaded_numel=models.loaded_numel)
    adapter_saved = _save_weights(trainer, tokenizer, spec, policy_dtype)
    trainer.accelerator.wait_for_everyone()
    saved = time.monotonic()
    return TrainingOutcome(
        steps=trainer.state.global_step,
        total_steps=trainer.state.max_steps,
        resumed_from_step=resumed_from_step,
        metrics=metrics,
        timings={"load": loaded - started, "train": trained - loaded, "save": saved - trained},
        adapter_saved=adapter_saved,
        gradient_accumulation_steps=trainer.args.gradient_accumulation_steps,
        ranks=ranks,
    )

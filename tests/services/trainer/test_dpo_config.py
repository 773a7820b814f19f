"""Every DPO hyperparameter of the job reaches TRL's DPOConfig, or is handled elsewhere on purpose.

The knobs are set to values that differ from both pairloop's and TRL's defaults, then built into a
real `DPOConfig` through `dpo_config(spec)`, the function training calls: a field that is dropped on
the way (or overwritten by a hard-coded value) shows as TRL's default instead of ours.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from pairloop.jobs import DPOHyperparameters
from services.trainer.dpo import HANDLED_OUTSIDE_DPOCONFIG, dpo_config
from services.trainer.spec import TrainingSpec

from .helpers import make_job

# One non-default value per field (TRL defaults bf16 and gradient checkpointing to on; bf16 must be
# off here anyway: the test host may have no GPU).
NON_DEFAULT: dict[str, Any] = {
    "beta": 0.25,
    "loss_type": ["ipo", "sft"],
    "loss_weights": [0.5, 2.0],
    "ld_alpha": 0.5,
    "use_weighting": True,
    "label_smoothing": 0.2,
    "f_divergence_type": "js_divergence",
    "discopop_tau": 0.1,
    "learning_rate": 3e-5,
    "num_train_epochs": 2.0,
    "max_steps": 7,
    "per_device_train_batch_size": 3,
    "gradient_accumulation_steps": 5,
    "max_length": 300,
    "max_prompt_length": 100,
    "warmup_ratio": 0.25,
    "lr_scheduler_type": "constant",
    "optim": "sgd",
    "bf16": False,
    "gradient_checkpointing": False,
    "dtype": "bfloat16",
    "seed": 7,
    "logging_steps": 3,
    "save_steps": 9,
    "precompute_ref_log_probs": True,
    "report_to": ["wandb"],
    # Handled outside DPOConfig (the launch, or the derived accumulation: 15 / (1 rank x 3) = 5).
    "global_batch_size": 15,
    "strategy": "ddp",
    "cpu_offload": True,
    "num_machines": 2,
    "simpo_gamma": 0.7,
}
# DPOConfig's names and forms of our fields, where they differ.
TRL_NAME = {"warmup_ratio": "warmup_steps"}
TRL_FORM: dict[str, Any] = {}


def spec_for(hp: dict[str, Any], tmp_path: Path) -> TrainingSpec:
    job = make_job("knobs", hyperparameters=hp)
    return TrainingSpec(
        job=job,
        policy_path=str(tmp_path / "p"),
        reference_path=str(tmp_path / "p"),
        dataset_path=str(tmp_path / "d"),
        dataset_cache=str(tmp_path / "c"),
        checkpoints_dir=str(tmp_path / "ck"),
        staging_dir=str(tmp_path / "st"),
        device="cpu",
    )


def test_the_table_sets_every_hyperparameter() -> None:
    # A new DPOHyperparameters field must be added here, so the next test checks it.
    assert set(NON_DEFAULT) == set(DPOHyperparameters.model_fields)


def test_every_hyperparameter_reaches_dpo_config_or_is_handled_elsewhere(tmp_path: Path) -> None:
    from trl import DPOConfig

    ours = dpo_config(spec_for(NON_DEFAULT, tmp_path))
    theirs = DPOConfig(output_dir=str(tmp_path / "x"), use_cpu=True, report_to=[])
    trl_fields = {f.name for f in dataclasses.fields(DPOConfig)}
    for name, value in NON_DEFAULT.items():
        if name in HANDLED_OUTSIDE_DPOCONFIG:
            assert name not in trl_fields, f"{name} is a DPOConfig field now: map it there"
            continue
        target = TRL_NAME.get(name, name)
        want = TRL_FORM.get(name, lambda v: v)(value)
        assert getattr(ours, target) == want, name
        assert getattr(theirs, target) != want, f"{name}: pick a value TRL does not default to"


def test_a_hyperparameter_dpo_config_does_not_know_fails_loudly(tmp_path: Path) -> None:
    # What a new DPOHyperparameters field without a DPOConfig counterpart does: a TypeError at
    # config time, never a silently ignored knob.
    class WithExtra(DPOHyperparameters):
        not_a_trl_knob: int = 1

    spec = spec_for({}, tmp_path)
    spec.job.hyperparameters = WithExtra()
    with pytest.raises(TypeError, match="not_a_trl_knob"):
        dpo_config(spec)

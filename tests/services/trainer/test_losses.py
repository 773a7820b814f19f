"""Every loss by name: its value on a fixed batch against a reference computed here, and a real
training job per new family (SimPO without any reference model, SPPO on win probabilities).

References: TRL's own DPOTrainer for TRL's losses (a plain `trl.DPOTrainer` on the same batch);
the papers' formulas, written out below from log-probs this test computes with its own forward
pass, for SimPO and SPPO.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pairloop.errors import ValidationError
from pairloop.jobs import DPOHyperparameters, TrainProgress
from pairloop.losses import ACCEPTED_LOSSES, TRL_LOSSES, needs_reference
from pairloop.preference_data import make_preference_row, write_preference_split
from pairloop_local.tiny_models import build_tiny_chat_model
from services.trainer.data import require_win_probabilities, to_conversational
from services.trainer.dpo import dpo_config, dpo_trainer_class
from services.trainer.runner import run_train_job
from services.trainer.settings import TrainerSettings
from services.trainer.spec import TrainingSpec

from .helpers import make_job

BETA, GAMMA = 0.5, 0.3
ANSWERS = [
    "The sea is blue, and the waves roll in under a long grey sky.",
    "no",
    "Paris is the capital of France.",
    "Seven is a prime number, and so is eleven.",
]
WIN_PROBS = [0.81, 0.12, 0.55, 0.47]


def rows(n: int) -> list[dict[str, Any]]:
    """Pairs whose chosen/rejected differ in length and win probability from row to row."""
    return [
        make_preference_row(
            prompt_id=f"p{i}",
            prompt=f"Say something about the number {i}.",
            responses=ANSWERS,
            scores=[0.9, -1.0, 0.2, 0.1],
            win_probs=WIN_PROBS,
            chosen_index=i % 4,
            rejected_index=(i + 1 + i // 4) % 4,
        )
        for i in range(n)
    ]


def test_trl_names_are_installed_trls() -> None:
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert tuple(re.findall(r"`'(\w+)'`", help_text)) == TRL_LOSSES


def test_an_unknown_loss_is_refused_with_the_accepted_names() -> None:
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'") as info:
        DPOHyperparameters(loss_type=["sigmoid", "dpo"])
    assert all(name in str(info.value) for name in ACCEPTED_LOSSES)
    with pytest.raises(ValueError, match="loss_weights has 1 entries for 2"):
        DPOHyperparameters(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="reference-free"):
        DPOHyperparameters(loss_type=["simpo", "sigmoid"])
    with pytest.raises(ValueError, match="ld_alpha"):
        DPOHyperparameters(loss_type="sppo", ld_alpha=0.5)
    assert DPOHyperparameters(loss_type="ipo").loss_type == ["ipo"]


def test_sppo_refuses_a_dataset_without_win_probabilities() -> None:
    import datasets

    one_missing = [{**r, "chosen_win_prob": None} if i else r for i, r in enumerate(rows(2))]
    ds = to_conversational(datasets.Dataset.from_list(one_missing), split="s")
    with pytest.raises(ValidationError, match="row 1: chosen_win_prob is None"):
        require_win_probabilities(ds, split="s")
    bubble = [{**r, "chosen_win_prob": None, "rejected_win_prob": None} for r in rows(2)]
    ds = to_conversational(datasets.Dataset.from_list(bubble), split="s")
    with pytest.raises(ValidationError, match="no column"):
        require_win_probabilities(ds, split="s")
    bare = to_conversational(
        datasets.Dataset.from_list(rows(2)).remove_columns(["chosen_win_prob"]), split="s"
    )
    with pytest.raises(ValidationError, match="no column"):
        require_win_probabilities(bare, split="s")


@pytest.fixture(scope="module")
def models(model_store: Path) -> dict[str, Path]:
    """The store's policy and a second, different model to be the reference."""
    other = model_store / "base-seed3"
    if not other.exists():
        build_tiny_chat_model(other, seed=3)
    return {"policy": model_store / "base", "reference": other}


def _load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(chosen, rejected) summed completion log-probs and completion lengths, by a plain forward."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logp.gather(2, batch["input_ids"][:, 1:].unsqueeze(2)).squeeze(2)
    mask = batch["completion_mask"][:, 1:].float()
    summed = (token * mask).sum(dim=1)
    lengths = mask.sum(dim=1)
    return (*summed.chunk(2), *lengths.chunk(2))


def _trainer(
    cls: Any, models: dict[str, Path], tmp_path: Path, hp: dict[str, Any], name: str
) -> Any:
    """A trainer of class `cls` for the loss(es) in `hp`, on the 8 fixed pairs, as training builds it."""
    import datasets
    from transformers import AutoTokenizer

    job = make_job(name, hyperparameters={**make_job("x").hyperparameters.model_dump(), **hp})
    spec = TrainingSpec(
        job=job,
        policy_path=str(models["policy"]),
        reference_path=str(models["reference"]),
        dataset_path=str(tmp_path / "d"),
        dataset_cache=str(tmp_path / "c"),
        checkpoints_dir=str(tmp_path / name),
        staging_dir=str(tmp_path / f"{name}-st"),
        device="cpu",
    )
    ds = to_conversational(datasets.Dataset.from_list(rows(8)), split="train")
    ref = _load(models["reference"]) if needs_reference(job.hyperparameters.loss_type) else None
    if hasattr(cls, "simpo_gamma"):
        cls.simpo_gamma = job.hyperparameters.simpo_gamma
    return cls(
        model=_load(models["policy"]),
        ref_model=ref,
        args=dpo_config(spec),
        train_dataset=ds,
        processing_class=AutoTokenizer.from_pretrained(models["policy"]),
    )


def _loss(trainer: Any, batch: dict[str, Any]) -> float:
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, dict(batch), False))


CASES = [
    # (loss_type, loss_weights, extra knobs): TRL's losses, alone and combined, with TRL's knobs.
    (["ipo"], None, {}),
    (["sigmoid", "sft"], [0.5, 2.0], {"ld_alpha": 0.5}),
    (["robust"], None, {"label_smoothing": 0.1, "use_weighting": True}),
    (["simpo"], None, {}),
    (["sppo"], None, {}),
    (["sppo", "sft"], [1.0, 0.25], {}),
]


@pytest.mark.parametrize(("names", "weights", "knobs"), CASES, ids=lambda v: str(v))
def test_loss_value_equals_the_reference(
    models: dict[str, Path],
    tmp_path: Path,
    names: list[str],
    weights: list[float] | None,
    knobs: dict[str, Any],
) -> None:
    from trl import DPOTrainer

    hp = {"loss_type": names, "loss_weights": weights, "beta": BETA, "simpo_gamma": GAMMA, **knobs}
    ours = _trainer(dpo_trainer_class(), models, tmp_path, hp, "ours")
    batch = ours.data_collator([ours.train_dataset[i] for i in range(8)])
    got = _loss(ours, batch)

    weight = dict(zip(names, weights or [1.0] * len(names), strict=True))
    trl_names = [n for n in names if n in TRL_LOSSES]
    expected = 0.0
    if trl_names:
        # TRL's own loss on the same batch: a plain DPOTrainer with only TRL's names.
        trl_hp = {**hp, "loss_type": trl_names, "loss_weights": [weight[n] for n in trl_names]}
        theirs = _trainer(DPOTrainer, models, tmp_path, trl_hp, "trl")
        expected += _loss(theirs, {k: v for k, v in batch.items() if "prob" not in k})
    with torch.no_grad():
        chosen, rejected, chosen_len, rejected_len = _sequence_logps(_load(models["policy"]), batch)
        ref_chosen, ref_rejected, _, _ = _sequence_logps(_load(models["reference"]), batch)
    if "simpo" in names:
        # SimPO, eq. 6: -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)
        margin = BETA * chosen / chosen_len - BETA * rejected / rejected_len - GAMMA
        expected += weight["simpo"] * float(-F.logsigmoid(margin).mean())
    if "sppo" in names:
        # SPPO (uclaml/SPPO trainer): ((r_w - (P_w - 1/2)/beta)^2 + (r_l - (P_l - 1/2)/beta)^2) / 2
        p_w, p_l = batch["chosen_win_prob"], batch["rejected_win_prob"]
        assert len(set(p_w.tolist())) > 1  # the probabilities reached the batch, row by row
        r_w, r_l = chosen - ref_chosen, rejected - ref_rejected
        per_pair = ((r_w - (p_w - 0.5) / BETA) ** 2 + (r_l - (p_l - 0.5) / BETA) ** 2) / 2
        expected += weight["sppo"] * float(per_pair.mean())
    assert math.isfinite(got) and got != 0.0
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_a_reference_free_loss_loads_no_reference(models: dict[str, Path], tmp_path: Path) -> None:
    trainer = _trainer(dpo_trainer_class(), models, tmp_path, {"loss_type": "simpo"}, "free")
    assert trainer.ref_model is None
    assert set(trainer.train_dataset["ref_chosen_logps"]) == {0.0}


@pytest.fixture(scope="module")
def settings(model_store: Path) -> Iterator[TrainerSettings]:
    threads = torch.get_num_threads()
    yield TrainerSettings(
        model_store_root=model_store, redis_url="redis://unused:1/0", cpu_threads=1
    )
    torch.set_num_threads(threads)


@pytest.mark.parametrize("loss", ["simpo", "sppo"])
def test_a_training_job_with_the_new_loss_publishes(
    model_store: Path, settings: TrainerSettings, loss: str
) -> None:
    dataset = model_store / "data" / "pairs-with-probs"
    if not dataset.exists():
        write_preference_split(dataset, "train_iteration_1", rows(8))
    hp = {
        **make_job("x").hyperparameters.model_dump(),
        "loss_type": [loss],
        "max_steps": 2,
        "save_steps": 2,
        "beta": 2.5 if loss == "simpo" else 0.1,
        "simpo_gamma": 0.25,
    }
    job = make_job(f"job-{loss}", dataset_path="data/pairs-with-probs", hyperparameters=hp)
    events: list[TrainProgress] = []
    result = run_train_job(job, settings, report=events.append)
    assert result.steps == 2
    assert math.isfinite(result.metrics[f"loss/{loss}"])
    assert result.metrics["loss"] == pytest.approx(
        result.metrics[f"loss/{loss}"], rel=1e-3, abs=1e-4
    )
    assert (Path(model_store) / job.output_path / "model.safetensors").is_file()
    if loss == "simpo":
        assert all(r.reference_local_numel is None for r in result.ranks)

"""SimPO and soft SPPO on top of TRL's DPOTrainer, which computes every other loss itself.

    simpo_loss(...)   SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta * (logp_w / |y_w| -
                      logp_l / |y_l|) - gamma). Reference-free; CPO's `simpo` with cpo_alpha=0.
    sppo_loss(...)    SPPO (Wu et al. 2024, eq. 4.7 as uclaml/SPPO's trainer computes it):
                      ((r_w - (P_w - 1/2) / beta)^2 + (r_l - (P_l - 1/2) / beta)^2) / 2, with
                      r = logp - logp_ref and P a response's probability of beating the others.

Why a DPOTrainer subclass and not `trl.experimental.cpo.CPOTrainer` for SimPO: CPOTrainer has a
config, tokenisation and forward of its own (full logits, no fused LM head), so the trainer's
path (prompt truncation, FSDP/DeepSpeed reference handling, resumable checkpoints) would fork.
Here TRL's `_compute_loss` runs unchanged for TRL's losses and metrics; the policy forward it makes
is recorded, and our losses are added from the same per-token log-probs (one forward pass).

Reference-free losses: the trainer is built with `precompute_ref_log_probs=True` and no reference
model, and the "precomputed" reference log-probs are zeros (no model runs), so TRL's reward
metrics become beta * logp, as in CPO/SimPO.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pairloop.errors import ValidationError
from pairloop.losses import (
    PAIRLOOP_LOSSES,
    PROBABILITY_COLUMNS,
    needs_reference,
    needs_win_probabilities,
)

__all__ = ["PairloopLossesMixin", "simpo_loss", "sppo_loss"]


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """Per-pair SimPO loss from summed log-probs and completion lengths (tokens)."""
    margin = chosen_logps / chosen_lengths.clamp(min=1) - rejected_logps / rejected_lengths.clamp(
        min=1
    )
    return -F.logsigmoid(beta * margin - gamma)


def sppo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_win_prob: torch.Tensor,
    rejected_win_prob: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """Per-pair soft SPPO loss: each log-ratio regressed on (win probability - 1/2) / beta."""
    chosen_target = (chosen_win_prob - 0.5) / beta
    rejected_target = (rejected_win_prob - 0.5) / beta
    return (
        (chosen_logratios - chosen_target) ** 2 + (rejected_logratios - rejected_target) ** 2
    ) / 2


class _Recorder:
    """Calls the model and keeps its last output: TRL's own forward, read by our losses."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.outputs: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.outputs = self.model(*args, **kwargs)
        return self.outputs


class _WithProbabilities:
    """Wraps TRL's preference collator: adds the win-probability columns as float tensors."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        for column in PROBABILITY_COLUMNS:
            batch[column] = torch.tensor([float(e[column]) for e in examples])
        return batch


class PairloopLossesMixin:
    """Mixed into DPOTrainer (before it): adds `simpo` and `sppo` to TRL's loss names.

    TRL's `loss_types`/`loss_weights` keep only TRL's names (TRL sums those); ours are summed on
    top with their weights. `simpo_gamma` is set by the caller (it is not a DPOConfig field).
    """

    simpo_gamma: float = 0.5
    # Set by DPOTrainer.__init__; declared for the type checker.
    args: Any
    beta: float
    loss_types: list[str]
    loss_weights: list[float]
    precompute_ref_logps: bool
    ref_model: Any
    model: Any
    data_collator: Any
    _metrics: dict[str, Any]
    _signature_columns: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names, weights = self.loss_types, self.loss_weights
        self._ours = [(n, w) for n, w in zip(names, weights, strict=True) if n in PAIRLOOP_LOSSES]
        self.loss_types = [n for n in names if n not in PAIRLOOP_LOSSES]
        self.loss_weights = [
            w for n, w in zip(names, weights, strict=True) if n not in PAIRLOOP_LOSSES
        ]
        if needs_win_probabilities(names):
            self.data_collator = _WithProbabilities(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]  # DPOTrainer's method
        if needs_win_probabilities(self.args.loss_type) and self._signature_columns is not None:
            self._signature_columns = [*self._signature_columns, *PROBABILITY_COLUMNS]

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        if needs_reference(self.args.loss_type):
            return super()._precompute_ref_logps(dataset, name, batch_size)  # type: ignore[misc]  # DPOTrainer's method
        # Reference-free: the log-ratio is the policy's log-prob itself.
        zeros = [0.0] * len(dataset)
        return dataset.add_column("ref_chosen_logps", zeros).add_column("ref_rejected_logps", zeros)

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        if not self._ours:
            return super()._compute_loss(model, inputs, return_outputs)  # type: ignore[misc]  # DPOTrainer's method
        inputs = dict(inputs)
        probs = {c: inputs.pop(c) for c in PROBABILITY_COLUMNS if c in inputs}
        if "ref_chosen_logps" not in inputs:
            # One reference pass, handed to TRL as if precomputed, so both sides use it.
            ref = self.ref_model if self.ref_model is not None else self.model
            ref_chosen, ref_rejected = self.compute_ref_log_probs(ref, inputs)  # type: ignore[attr-defined]  # DPOTrainer's method
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_chosen, ref_rejected
        recorder = _Recorder(model)
        precompute, self.precompute_ref_logps = self.precompute_ref_logps, True
        try:
            result = super()._compute_loss(recorder, inputs, return_outputs)  # type: ignore[misc]  # DPOTrainer's method
        finally:
            self.precompute_ref_logps = precompute
        trl_loss, outputs = result if return_outputs else (result, None)

        mask = inputs["completion_mask"][..., 1:]
        per_token = recorder.outputs.log_probs[:, -mask.size(1) :] * mask
        chosen_logps, rejected_logps = per_token.sum(dim=1).chunk(2, dim=0)
        chosen_len, rejected_len = mask.sum(dim=1).chunk(2, dim=0)
        ref_chosen = inputs["ref_chosen_logps"].to(chosen_logps.dtype)
        ref_rejected = inputs["ref_rejected_logps"].to(chosen_logps.dtype)
        mode = "train" if self.model.training else "eval"
        loss = trl_loss
        for name, weight in self._ours:
            if name == "simpo":
                per_pair = simpo_loss(
                    chosen_logps,
                    rejected_logps,
                    chosen_len,
                    rejected_len,
                    beta=self.beta,
                    gamma=self.simpo_gamma,
                )
            else:
                missing = [c for c in PROBABILITY_COLUMNS if c not in probs]
                if missing:
                    raise ValidationError(
                        f"loss_type sppo needs the dataset columns {list(PROBABILITY_COLUMNS)}; "
                        f"missing {missing}. Rank with the ranker's full mode (it gives win "
                        "probabilities) or choose another loss",
                        param="hyperparameters.loss_type",
                    )
                per_pair = sppo_loss(
                    chosen_logps - ref_chosen,
                    rejected_logps - ref_rejected,
                    probs["chosen_win_prob"].to(chosen_logps),
                    probs["rejected_win_prob"].to(chosen_logps),
                    beta=self.beta,
                )
            self._metrics[mode][f"loss/{name}"].append(per_pair.detach().mean().item())
            loss = loss + weight * per_pair.mean()
        return (loss, outputs) if return_outputs else loss

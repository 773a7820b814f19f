"""Loading the policy and the reference without a full copy on every rank.

Used by `dpo.py` before the Trainer is built. Under FSDP with accelerate's
`fsdp_cpu_ram_efficient_loading` (services/trainer/accelerate/fsdp.yaml), only global rank 0
reads the weights; every other rank builds the same models with their parameters on the meta
device (no memory) and receives its shards at `prepare`: accelerate's `fsdp2_prepare_model`
broadcasts rank 0's tensors one parameter at a time for the policy, and `sharding.py` does the
same for the reference. transformers' own path for this (`is_fsdp_enabled()` and not
`is_local_dist_rank_0()` in `from_pretrained`) still fills a full zero-valued copy on the host of
every other rank, so it is not used: the empty models are built from the config here.

A reference equal to the policy (same path) is read from disk once: it is a frozen copy of the
loaded policy, in the reference's dtype.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairloop.errors import ValidationError

__all__ = ["LoadedModels", "load_models", "materialised_numel", "rank_loads_weights"]


@dataclass
class LoadedModels:
    """The policy, the reference (None: TRL derives it) and what this rank holds of them."""

    policy: Any
    reference: Any
    loaded_numel: int  # parameter elements this rank read from disk (or copied from them)


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def rank_loads_weights() -> bool:
    """False on the ranks that get their weights by broadcast at `prepare` (FSDP, rank > 0).

    `transformers.integrations.is_fsdp_enabled()` is the libraries' own switch for it: true in
    the ranks of an FSDP launch with `fsdp_cpu_ram_efficient_loading` (accelerate exports it to
    the ranks' environment), and it is what makes `fsdp2_prepare_model` broadcast from rank 0.
    """
    import torch.distributed as dist
    from transformers.integrations import is_fsdp_enabled

    return not is_fsdp_enabled() or dist.get_rank() == 0


def materialised_numel(*models: Any) -> int:
    """Parameter elements of `models` that are not on the meta device."""
    return sum(p.numel() for m in models if m is not None for p in m.parameters() if not p.is_meta)


def _empty_causal_lm(config: Any, dtype: str) -> Any:
    """The model for `config` with its parameters on the meta device, its buffers real.

    Non-persistent buffers (rotary frequencies) are not in any state dict, so they are computed
    here, as `from_pretrained` would: accelerate keeps them across sharding.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=_torch_dtype(dtype))


def _unbacked_parameters(model: Any) -> None:
    """Give `model`'s meta parameters host storage that is allocated but never written.

    accelerate maps the optimizer's parameters to the sharded ones by `data_ptr()` at
    `prepare`; on the meta device every pointer is 0, and all of them would map to one
    parameter. `torch.empty` reserves address space only: no page is touched, so the resident
    memory does not grow (accelerate's own design: "non-main ranks only have `torch.empty`").
    """
    import torch

    made: dict[int, Any] = {}  # a tied parameter stays one parameter
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                made[id(param)] = torch.nn.Parameter(
                    torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad
                )
            module._parameters[name] = made[id(param)]


def _load_causal_lm(path: str, dtype: str, *, what: str, empty: bool) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if empty:
            return _empty_causal_lm(AutoConfig.from_pretrained(path), dtype)
        return AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise ValidationError(
            f"{what} at {path!r} could not be loaded as a causal LM: {exc}", param=f"{what}_path"
        ) from exc


def reference_from_policy(policy: Any, dtype: str) -> Any:
    """A frozen copy of `policy` in `dtype`, built from memory (an empty one where it is empty)."""
    import torch

    reference = _empty_causal_lm(policy.config, dtype)
    if any(p.is_meta for p in policy.parameters()):
        return reference  # this rank gets its reference shards by broadcast as well
    target = _torch_dtype(dtype)
    with torch.no_grad():
        state = {
            name: tensor.detach().to(dtype=target, copy=True)
            for name, tensor in policy.state_dict().items()
        }
    reference.load_state_dict(state, strict=True, assign=True)
    reference.tie_weights()  # a tied model's state dict named the shared tensor twice
    if getattr(policy, "generation_config", None) is not None:
        reference.generation_config = copy.deepcopy(policy.generation_config)
    return reference


def load_models(
    policy_path: str, reference_path: str | None, *, policy_dtype: str, reference_dtype: str
) -> LoadedModels:
    """Load the policy and the reference (`reference_path` None: no reference model)."""
    empty = not rank_loads_weights()
    policy = _load_causal_lm(policy_path, policy_dtype, what="policy", empty=empty)
    reference = None
    if reference_path is not None:
        if Path(reference_path).resolve() == Path(policy_path).resolve():
            reference = reference_from_policy(policy, reference_dtype)
        else:
            reference = _load_causal_lm(
                reference_path, reference_dtype, what="reference", empty=empty
            )
        # Frozen: and accelerate upcasts trainable low-precision parameters to float32 at
        # prepare, which would double a bf16 reference.
        reference.requires_grad_(False)
        reference.eval()
    loaded = 0 if empty else materialised_numel(policy, reference)
    if empty:
        _unbacked_parameters(policy)  # after the reference copied the policy's (empty) shapes
    return LoadedModels(policy, reference, loaded)

"""Before any work: the generators serve what the run was admitted for.

    await check_generators(cfg, generators)      # orchestrator.loop's preflight, every (re)start

Prompt admission (`orchestrator.admission`) kept every prompt within the context it assumed
(`sampling.max_model_len`, else the base model's), and the run expects the policy in one dtype
(`sampling.dtype`). A generator started with a smaller `--max-model-len` would fail every long
prompt one by one, hours in; one in another dtype would generate from other numbers than the
trainer's. Both are read from the generator's `/v1/models` and compared here, with both figures
in the error.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.admission import generator_context
from orchestrator.clients import GeneratorClient
from orchestrator.config import RunConfig
from pairloop.contracts.generator import ModelList
from pairloop.errors import PairloopError
from pairloop.model_config import checkpoint_dtype

__all__ = ["GeneratorMismatchError", "check_generators", "expected_dtype"]


class GeneratorMismatchError(PairloopError):
    """A generator serves another context or dtype than the run assumed."""


def expected_dtype(cfg: RunConfig) -> str | None:
    """The dtype the generator must serve (None: the checkpoint names none, nothing to check)."""
    if cfg.sampling.dtype != "auto":
        return cfg.sampling.dtype
    own = checkpoint_dtype(cfg.base_model)
    return None if own == "auto" else own


async def check_generators(cfg: RunConfig, generators: Sequence[GeneratorClient]) -> None:
    """Raise GeneratorMismatchError naming the first generator whose served context is smaller
    than the one admission assumed, or whose dtype is not `expected_dtype(cfg)`."""
    context, where = generator_context(cfg)
    dtype = expected_dtype(cfg)
    for client in generators:
        models = await client.call("GET", "/v1/models", ModelList)
        card = models.data[0] if models.data else None
        served = card.max_model_len if card else None
        if served is None:
            raise GeneratorMismatchError(
                f"generator at {client.base_url} does not report its context (max_model_len in "
                f"/v1/models), and the run's prompts were admitted for {context} ({where}); "
                "run the generator of this version"
            )
        if served < context:
            raise GeneratorMismatchError(
                f"generator at {client.base_url} serves a context of {served} tokens, but the "
                f"run's prompts were admitted for {context} ({where}); start the generator with "
                f"--max-model-len {context} (PAIRLOOP_GENERATOR_MAX_MODEL_LEN), or create the "
                f"run with sampling.max_model_len: {served}"
            )
        if dtype is not None and card is not None and card.dtype != dtype:
            raise GeneratorMismatchError(
                f"generator at {client.base_url} serves the policy in {card.dtype}, but the run "
                f"expects {dtype} (sampling.dtype: {cfg.sampling.dtype}); start the generator "
                f"with --dtype {dtype} (PAIRLOOP_GENERATOR_DTYPE), or create the run with "
                f"sampling.dtype: {card.dtype}"
            )

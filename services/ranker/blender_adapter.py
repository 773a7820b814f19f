"""The one module that imports llm-blender: shims for transformers 5, loading, tokens, forward.

llm-blender 0.0.2 was written against transformers 4. On transformers 5 it needs:
  - `transformers.utils.hub.TRANSFORMERS_CACHE` (removed): set to the Hugging Face hub cache;
  - tokenizer `batch_encode_plus` / `encode_plus` (removed): both are `__call__` with the same kwargs.
It also imports vLLM when vLLM is installed (only for `n_generate`, which we never call): about 1 s
and 50 MB per process, so the import is blocked while llm-blender loads, unless vLLM is already in.

The model is loaded by llm-blender's own `Blender().loadranker`, and comparisons run through the
loaded ranker's own `_forward` (the same call `Blender.rank` makes); this module only prepares the
token ids exactly as llm-blender's `CrossCompareCollator` does, so that batches can be formed
across items and requests by length. Everything else in the service is llm-blender-free.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PairRMModel",
    "TokenIds",
    "import_llm_blender",
    "load_blender",
    "load_pairrm",
    "resolve_checkpoint",
]

log = logging.getLogger(__name__)

# Texts must not contain PairRM's control tokens: an extra <|candidate|> in a response makes the
# ranker gather two encodings for one candidate and crash. llm-blender already replaces the
# separator token by a space; these get the same treatment.
_CONTROL_TOKENS = ("<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>")


def _install_shims() -> None:
    import transformers.utils.hub as hub
    from huggingface_hub import constants
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if not hasattr(hub, "TRANSFORMERS_CACHE"):
        # transformers 5 removed it; llm-blender 0.0.2 still imports it.
        hub.TRANSFORMERS_CACHE = constants.HF_HUB_CACHE  # type: ignore[attr-defined]  # see above
    for name in ("batch_encode_plus", "encode_plus"):
        if not hasattr(PreTrainedTokenizerBase, name):
            setattr(PreTrainedTokenizerBase, name, PreTrainedTokenizerBase.__call__)


@contextlib.contextmanager
def _vllm_blocked() -> Iterator[None]:
    """Make `import vllm` fail with ImportError (llm-blender's own fallback) for the duration."""
    if "vllm" in sys.modules:  # already paid for by someone else: nothing to save
        yield
        return
    # None in sys.modules is the documented way to make an import raise ImportError.
    sys.modules["vllm"] = None  # type: ignore[assignment]  # see above
    try:
        yield
    finally:
        if sys.modules.get("vllm", 0) is None:
            del sys.modules["vllm"]


@contextlib.contextmanager
def _root_logging_muted() -> Iterator[None]:
    root = logging.getLogger()
    was = root.disabled
    root.disabled = True
    try:
        yield
    finally:
        root.disabled = was


def import_llm_blender() -> Any:
    """`llm_blender`, imported once with the shims in place (and without vLLM)."""
    if "llm_blender" not in sys.modules:
        _install_shims()
        with _vllm_blocked():
            import llm_blender  # noqa: F401
    return sys.modules["llm_blender"]


def resolve_checkpoint(model: str, *, cache_dir: str | None = None) -> Path:
    """A local directory for `model`: itself if it is one, else its hub snapshot.

    With HF_HUB_OFFLINE=1 the snapshot must already be in the cache; the error says so.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model {model!r} is not a checkpoint directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=model, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise FileNotFoundError(
            f"model {model!r} is neither a local directory nor available from the Hugging Face "
            f"hub or its cache (HF_HUB_OFFLINE set?): {exc}"
        ) from None


def _backbone_override(checkpoint: Path) -> dict[str, str]:
    """Resolve a relative `model_name` (the backbone) against the checkpoint directory."""
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no config.json: not a PairRM checkpoint")
    config = json.loads(config_path.read_text())
    if config.get("ranker_type") != "pairranker":
        raise ValueError(
            f"{checkpoint} is a {config.get('ranker_type')!r} ranker, not a PairRM (pairranker) "
            "one; use --backend reward-model for sequence-classification reward models"
        )
    name = config.get("model_name")
    if name and not Path(name).is_absolute() and (checkpoint / name).is_dir():
        return {"model_name": str((checkpoint / name).resolve())}
    return {}


def load_blender(
    model: str,
    *,
    device: str,
    cache_dir: str | None = None,
    source_max_length: int | None = None,
    candidate_max_length: int | None = None,
) -> Any:
    """llm-blender's own `Blender` with its ranker loaded by `loadranker`, in float32 on `device`.

    Used by the service and, as the reference implementation, by its tests and benchmark.
    """
    llm_blender = import_llm_blender()
    checkpoint = resolve_checkpoint(model, cache_dir=cache_dir)
    overrides: dict[str, Any] = _backbone_override(checkpoint)
    if source_max_length is not None:
        overrides["source_maxlength"] = source_max_length
    if candidate_max_length is not None:
        overrides["candidate_maxlength"] = candidate_max_length
    if cache_dir is not None:
        overrides["cache_dir"] = cache_dir
    with _root_logging_muted():  # Blender() warns "no ranker loaded": it is, on the next line
        blender = llm_blender.Blender(llm_blender.BlenderConfig(device=device, use_tqdm=False))
    # fp16=False: keep float32 here; the service casts to its own dtype setting afterwards.
    with warnings.catch_warnings():
        # dataclasses_json warns for every null field of the ranker's config.json.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="dataclasses_json")
        blender.loadranker(str(checkpoint), device=device, fp16=False, **overrides)
    return blender


@dataclass(frozen=True)
class TokenIds:
    """One text's token ids as PairRM sees them ([CLS] prefix ... [SEP]) and whether it was cut."""

    ids: tuple[int, ...]
    truncated: bool


class PairRMModel:
    """A loaded PairRM: tokenization identical to llm-blender's collator, and batched comparisons.

    `compare(rows)` returns PairRM's logit for each (source, left, right) row: > 0 means left is
    better. It is `CrossCompareReranker._forward`, the call behind `Blender.rank`.
    """

    def __init__(self, blender: Any, *, name: str) -> None:
        import torch

        self.name = name
        self.blender = blender
        self.ranker = blender.ranker
        self.tokenizer = blender.ranker_tokenizer
        self.device = torch.device(blender.ranker_config.device)
        self.source_max_length = int(blender.ranker_config.source_maxlength)
        self.candidate_max_length = int(blender.ranker_config.candidate_maxlength)
        collator = blender.ranker_collator
        if collator.mannually_add_sep_token:
            raise ValueError(
                f"{name}: the backbone's tokenizer encodes its separator as a single token; "
                "only DeBERTa-style PairRM checkpoints (like llm-blender/PairRM) are supported"
            )
        self._sep = str(collator.sep_token)
        self._source_prefix = str(collator.source_prefix)
        self._candidate_prefix = str(collator.candidate_prefix)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self._tokenizer_lock = threading.Lock()

    @property
    def dtype(self) -> Any:
        return next(self.ranker.parameters()).dtype

    def to_dtype(self, dtype: Any) -> None:
        self.ranker.to(dtype)

    def _clean(self, text: str) -> str:
        for token in (self._sep, *_CONTROL_TOKENS):
            text = text.replace(token, " ")
        return text

    def _encode(self, texts: Sequence[str], limits: Sequence[int]) -> list[TokenIds]:
        # Calls change the fast tokenizer's truncation state and requests are tokenized on
        # worker threads: serialise them (older `tokenizers` raised "Already borrowed").
        with self._tokenizer_lock:
            full = self.tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
            out = []
            for text, ids, limit in zip(texts, full, limits, strict=True):
                if len(ids) <= limit:
                    out.append(TokenIds(tuple(ids), False))
                else:  # the tokenizer's own truncation, exactly as the collator calls it
                    cut = self.tokenizer(text, max_length=limit, truncation=True)["input_ids"]
                    out.append(TokenIds(tuple(cut), True))
        return out

    def encode_sources(self, prompts: Sequence[str]) -> list[TokenIds]:
        texts = [self._source_prefix + self._clean(p) for p in prompts]
        return self._encode(texts, [self.source_max_length] * len(texts))

    def candidate_limit(self, source: TokenIds) -> int:
        """Tokens a candidate may keep next to `source`.

        llm-blender's collator gives candidates half of the source budget the prompt left unused:
        `candidate_maxlength + (source_maxlength - source_len) // 2`, with source_len the longest
        source of its batch. Here the batch is the item, so an item's numbers never depend on
        which other items it happens to be batched with.
        """
        return self.candidate_max_length + (self.source_max_length - len(source.ids)) // 2

    def encode_candidates(self, candidates: Sequence[str], *, limit: int) -> list[TokenIds]:
        texts = [self._candidate_prefix + self._clean(c) for c in candidates]
        return self._encode(texts, [limit] * len(texts))

    def _pad(self, seqs: Sequence[Sequence[int]]) -> tuple[Any, Any]:
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids.to(self.device), mask.to(self.device)

    def compare(
        self, rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]
    ) -> np.ndarray:
        """PairRM logits (float32) for (source ids, left candidate ids, right candidate ids) rows."""
        import torch

        sources, lefts, rights = zip(*rows, strict=True)
        src, src_mask = self._pad(sources)
        left, left_mask = self._pad(lefts)
        right, right_mask = self._pad(rights)
        # inference_mode is thread-local: it must be entered in the thread that runs the forward.
        with torch.inference_mode():
            out = self.ranker._forward(src, src_mask, left, left_mask, right, right_mask)
        return out["logits"].float().cpu().numpy()


def load_pairrm(
    model: str,
    *,
    device: str,
    dtype: str = "float32",
    cache_dir: str | None = None,
    source_max_length: int | None = None,
    candidate_max_length: int | None = None,
) -> PairRMModel:
    """Load a PairRM checkpoint (directory or hub name) for the service."""
    import torch

    blender = load_blender(
        model,
        device=device,
        cache_dir=cache_dir,
        source_max_length=source_max_length,
        candidate_max_length=candidate_max_length,
    )
    loaded = PairRMModel(blender, name=model)
    if dtype != "float32":
        loaded.to_dtype(getattr(torch, dtype))
    return loaded

"""Reward-model backend: any `AutoModelForSequenceClassification` with one label scores a response.

    python -m services.ranker --backend reward-model --model Skywork/Skywork-Reward-V2-Qwen3-0.6B

Each (prompt, candidate) becomes one sequence: the tokenizer's chat template over a user and an
assistant turn (modern reward models) or, without a template, the text pair (prompt, candidate)
(BERT-style reward models); `--reward-input-format` forces either. The score is the model's single
logit. Prompt and candidate are cut to the source / candidate token limits (1224 / 412 unless set)
and the whole sequence to the model's maximum length; the response says what was cut.
Sequences are batched across items and requests by the same length-aware micro-batcher as PairRM.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

from pairloop.contracts.ranker import Truncation
from services.ranker.batching import MicroBatcher
from services.ranker.memory import memory_budget
from services.ranker.metrics import RankerMetrics
from services.ranker.rankers.base import PointwiseRanker
from services.ranker.settings import RankerSettings

__all__ = ["RewardModelRanker", "build"]

log = logging.getLogger(__name__)

DEFAULT_SOURCE_MAX = 1224
DEFAULT_CANDIDATE_MAX = 412
_UNBOUNDED = 1_000_000  # tokenizers without a real limit report ~1e30


class RewardModelRanker(PointwiseRanker):
    """`Ranker` over a sequence-classification reward model (one logit = the score)."""

    backend = "reward-model"

    def __init__(
        self, model: Any, tokenizer: Any, *, settings: RankerSettings, metrics: RankerMetrics
    ) -> None:
        import torch

        self.net = model
        self.tokenizer = tokenizer
        self.model = settings.model
        self.device = torch.device(settings.device)
        fmt = settings.reward_input_format
        if fmt == "auto":
            fmt = "chat" if getattr(tokenizer, "chat_template", None) else "pair"
        self.input_format = fmt
        self.source_max = settings.source_max_length or DEFAULT_SOURCE_MAX
        self.candidate_max = settings.candidate_max_length or DEFAULT_CANDIDATE_MAX
        limits = [
            getattr(model.config, "max_position_embeddings", None),
            tokenizer.model_max_length,
        ]
        usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < _UNBOUNDED]
        self.max_length = min(usable) if usable else None
        self.pad_id = int(model.config.pad_token_id)
        self._tokenizer_lock = threading.Lock()
        self.batcher: MicroBatcher[tuple[int, ...], float] = MicroBatcher(
            self._run_batch,
            metrics=metrics,
            max_batch_size=settings.batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.batch_wait_ms / 1000.0,
            sort_window=settings.sort_window,
            budget=memory_budget(settings, model.config),
        )

    async def start(self) -> None:
        ids, _ = self._encode("warm-up", "ok")
        await asyncio.to_thread(self._run_batch, [ids])
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()

    @property
    def ready(self) -> bool:
        return self.batcher.running

    def _cut(self, text: str, limit: int) -> tuple[str, bool]:
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) <= limit:
            return text, False
        return self.tokenizer.decode(ids[:limit]), True

    def _encode(self, prompt: str, candidate: str) -> tuple[tuple[int, ...], Truncation]:
        prompt, prompt_cut = self._cut(prompt, self.source_max)
        candidate, candidate_cut = self._cut(candidate, self.candidate_max)
        if self.input_format == "chat":
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": candidate}],
                tokenize=False,
            )
            ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt, candidate, verbose=False)["input_ids"]
        if self.max_length is not None and len(ids) > self.max_length:
            ids, candidate_cut = ids[: self.max_length], True  # the end (the candidate) goes
        return tuple(ids), Truncation(prompt=prompt_cut, candidates=[candidate_cut])

    def _run_batch(self, rows: list[tuple[int, ...]]) -> list[float]:
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        with torch.inference_mode():
            logits = self.net(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits
        return logits[:, 0].float().cpu().tolist()

    def _encode_items(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]
    ) -> list[list[tuple[tuple[int, ...], Truncation]]]:
        # Calls change the fast tokenizer's truncation state and requests are tokenized on
        # worker threads: serialise them (older `tokenizers` raised "Already borrowed").
        with self._tokenizer_lock:
            return [
                [self._encode(p, c) for c in cands]
                for p, cands in zip(prompts, candidates, strict=True)
            ]

    async def score_items(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *, request: int
    ) -> list[tuple[list[float], Truncation]]:
        encoded = await asyncio.to_thread(self._encode_items, prompts, candidates)
        futures = [
            [self.batcher.submit(ids, length=len(ids), request=request) for ids, _ in item]
            for item in encoded
        ]
        out = []
        for item, item_futures in zip(encoded, futures, strict=True):
            scores = list(await asyncio.gather(*item_futures))
            truncation = Truncation(
                prompt=any(t.prompt for _, t in item),
                candidates=[t.candidates[0] for _, t in item],
            )
            out.append((scores, truncation))
        return out


def build(settings: RankerSettings, metrics: RankerMetrics) -> RewardModelRanker:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.model, cache_dir=settings.cache_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        settings.model, cache_dir=settings.cache_dir, dtype=getattr(torch, settings.dtype)
    )
    if model.config.num_labels != 1:
        raise ValueError(
            f"{settings.model} has {model.config.num_labels} labels; a reward model has exactly "
            "one (its logit is the score)"
        )
    if tokenizer.pad_token_id is None:  # decoder reward models often have none: pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # needed to find each row's last token when batched
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(settings.device).eval()
    return RewardModelRanker(model, tokenizer, settings=settings, metrics=metrics)

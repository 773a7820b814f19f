"""PairRM backend: llm-blender's pairwise ranker, with comparisons batched across items and requests.

Every comparison is one sequence `[source][left candidate][right candidate]` through the model,
giving L(left, right) (> 0: left is better). For an item with n candidates:
  - full mode: all n(n-1) ordered pairs; C[i, j] = L(i, j); scores = mean_j(C - C^T)[i]
    (llm-blender's `_full_predict` + `get_scores_from_cmps`, same float32 arithmetic), and win
    probabilities mean_{j != i} sigmoid((C[i, j] - C[j, i]) / 2) from the same comparisons;
  - bubble mode: one bubble pass in the given order, both orders per step (n-1 steps), exactly
    llm-blender's `_bubble_predict` started from the identity permutation instead of a random one,
    so the answer is reproducible. Ranking runs the best and the worst pass together and shares
    their first comparison.
  - compare: L(a, b) and L(b, a); logit = (L(a, b) - L(b, a)) / 2.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pairloop.contracts.ranker import (
    CompareItem,
    CompareResult,
    RankItem,
    RankMode,
    RankResult,
    SelectResult,
    Truncation,
)
from services.ranker.batching import MicroBatcher
from services.ranker.blender_adapter import PairRMModel, TokenIds, load_pairrm
from services.ranker.memory import memory_budget
from services.ranker.metrics import RankerMetrics
from services.ranker.rankers.base import (
    Pick,
    rank_from_scores,
    select_from_rank,
    sigmoid,
    win_probs_from_logits,
)
from services.ranker.settings import RankerSettings

__all__ = ["PairRMRanker", "build"]

_Row = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass
class _Encoded:
    source: TokenIds
    candidates: list[TokenIds]

    @property
    def truncation(self) -> Truncation:
        return Truncation(
            prompt=self.source.truncated, candidates=[c.truncated for c in self.candidates]
        )


class _Comparisons:
    """L(i, j) for one item, each ordered pair submitted once and shared by whoever asks."""

    def __init__(self, ranker: PairRMRanker, encoded: _Encoded, request: int) -> None:
        self._ranker = ranker
        self._encoded = encoded
        self._request = request
        self._futures: dict[tuple[int, int], asyncio.Future[np.float32]] = {}

    def submit(self, i: int, j: int) -> asyncio.Future[np.float32]:
        if (i, j) not in self._futures:
            source = self._encoded.source.ids
            left, right = self._encoded.candidates[i].ids, self._encoded.candidates[j].ids
            self._futures[i, j] = self._ranker.batcher.submit(
                (source, left, right),
                length=len(source) + len(left) + len(right),
                request=self._request,
            )
        return self._futures[i, j]

    async def both_orders(self, i: int, j: int) -> np.float32:
        """L(i, j) - L(j, i) in float32: llm-blender's `preds + preds_inv` in a bubble step."""
        forward, backward = await asyncio.gather(self.submit(i, j), self.submit(j, i))
        return np.float32(forward) - np.float32(backward)


class PairRMRanker:
    """`Ranker` over a PairRM checkpoint loaded by llm-blender."""

    backend = "pairrm"

    def __init__(self, model: PairRMModel, *, settings: RankerSettings, metrics: RankerMetrics):
        self.pairrm = model
        self.model = settings.model
        self.batcher: MicroBatcher[_Row, np.float32] = MicroBatcher(
            self._run_batch,
            metrics=metrics,
            max_batch_size=settings.batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.batch_wait_ms / 1000.0,
            sort_window=settings.sort_window,
            budget=memory_budget(settings, model.ranker.config),
        )

    def _run_batch(self, rows: list[_Row]) -> list[np.float32]:
        return list(self.pairrm.compare(rows))

    async def start(self) -> None:
        # One real forward before /ready says yes: a broken dtype or device fails at startup.
        encoded = self._encode(["warm-up"], [["a", "b"]])[0]
        rows = [(encoded.source.ids, encoded.candidates[0].ids, encoded.candidates[1].ids)]
        await asyncio.to_thread(self._run_batch, rows)
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()

    @property
    def ready(self) -> bool:
        return self.batcher.running

    def _encode(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]
    ) -> list[_Encoded]:
        sources = self.pairrm.encode_sources(prompts)
        return [
            _Encoded(
                src, self.pairrm.encode_candidates(cands, limit=self.pairrm.candidate_limit(src))
            )
            for src, cands in zip(sources, candidates, strict=True)
        ]

    async def _encode_async(
        self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]
    ) -> list[_Encoded]:
        # Off the event loop: a large request's tokenization overlaps the running forward passes.
        return await asyncio.to_thread(self._encode, prompts, candidates)

    async def _full(self, encoded: _Encoded, request: int) -> RankResult:
        n = len(encoded.candidates)
        cmps = _Comparisons(self, encoded, request)
        pairs = list(itertools.permutations(range(n), 2))
        futures = [cmps.submit(i, j) for i, j in pairs]
        matrix = np.zeros((n, n), dtype=np.float32)
        for (i, j), value in zip(pairs, await asyncio.gather(*futures), strict=True):
            matrix[i, j] = value
        scores = (matrix - matrix.T).mean(axis=-1)  # float32, as get_scores_from_cmps
        # Both orders averaged, as /v1/compare: logit(i beats j) = (L(i, j) - L(j, i)) / 2.
        logits = (matrix.astype(np.float64) - matrix.T.astype(np.float64)) / 2.0
        return rank_from_scores(
            scores.tolist(), encoded.truncation, win_probs_from_logits(logits.tolist())
        )

    @staticmethod
    async def _bubble(cmps: _Comparisons, n: int, pick: Pick) -> int:
        order = list(range(n))
        for j in range(n - 1):
            cur, nxt = order[j], order[j + 1]
            diff = await cmps.both_orders(cur, nxt)
            # The better (best pass) or worse (worst pass) one moves on; a tie moves `nxt` on,
            # as in llm-blender.
            cur_moves_on = diff > 0 if pick == "best" else diff < 0
            order[j], order[j + 1] = (nxt, cur) if cur_moves_on else (cur, nxt)
        return order[-1]

    async def _bubble_rank(self, encoded: _Encoded, request: int) -> RankResult:
        n = len(encoded.candidates)
        cmps = _Comparisons(self, encoded, request)
        best, worst = await asyncio.gather(
            self._bubble(cmps, n, "best"), self._bubble(cmps, n, "worst")
        )
        return RankResult(
            scores=None,
            ranks=None,
            best_index=best,
            worst_index=worst,
            tie=best == worst,
            truncated=encoded.truncation,
        )

    async def rank(
        self, items: Sequence[RankItem], *, mode: RankMode, request: int
    ) -> list[RankResult]:
        encoded = await self._encode_async([i.prompt for i in items], [i.candidates for i in items])
        one = self._full if mode == "full" else self._bubble_rank
        return list(await asyncio.gather(*(one(e, request) for e in encoded)))

    async def compare(self, items: Sequence[CompareItem], *, request: int) -> list[CompareResult]:
        encoded = await self._encode_async([i.prompt for i in items], [[i.a, i.b] for i in items])

        async def one(e: _Encoded) -> CompareResult:
            logit = float(await _Comparisons(self, e, request).both_orders(0, 1)) / 2.0
            return CompareResult(prob_a_beats_b=sigmoid(logit), logit=logit, truncated=e.truncation)

        return list(await asyncio.gather(*(one(e) for e in encoded)))

    async def select(
        self, items: Sequence[RankItem], *, pick: Pick, mode: RankMode, request: int
    ) -> list[SelectResult]:
        if mode == "full":
            ranked = await self.rank(items, mode="full", request=request)
            return [select_from_rank(i, r, pick) for i, r in zip(items, ranked, strict=True)]
        encoded = await self._encode_async([i.prompt for i in items], [i.candidates for i in items])

        async def one(item: RankItem, e: _Encoded) -> SelectResult:
            cmps = _Comparisons(self, e, request)
            index = await self._bubble(cmps, len(e.candidates), pick)
            return SelectResult(
                index=index, candidate=item.candidates[index], truncated=e.truncation
            )

        return list(await asyncio.gather(*(one(i, e) for i, e in zip(items, encoded, strict=True))))


def build(settings: RankerSettings, metrics: RankerMetrics) -> PairRMRanker:
    model = load_pairrm(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.cache_dir,
        source_max_length=settings.source_max_length,
        candidate_max_length=settings.candidate_max_length,
    )
    return PairRMRanker(model, settings=settings, metrics=metrics)

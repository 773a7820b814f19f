"""Best-of-n serving: OpenAI-compatible chat completions that return the ranker's best of `best_of`.

The recipe's strongest AlpacaEval 2.0 figure (34.86) came from PairRM best-of-16 over the final
policy; this route is that, as a service.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from orchestrator.api.deps import GeneratorDep, RankerDep, SettingsDep
from orchestrator.api.schemas import BestOfChatRequest, BestOfChatResponse
from pairloop.contracts.generator import VERSION_HEADER, ChatCompletionChoice, ChatCompletionRequest
from pairloop.contracts.ranker import RankItem, RankRequest
from pairloop.errors import ValidationError
from pairloop.http import error_responses

router = APIRouter(prefix="/v1", tags=["best-of-n"])


@router.post(
    "/chat/completions", response_model=BestOfChatResponse, responses=error_responses(400, 502, 503)
)
async def best_of_chat(
    body: BestOfChatRequest,
    response: Response,
    generator: GeneratorDep,
    ranker: RankerDep,
    settings: SettingsDep,
) -> BestOfChatResponse:
    if body.stream:
        raise ValidationError(
            "stream is not supported for best-of-n (the ranker needs every sample)", param="stream"
        )
    if body.n != 1:
        raise ValidationError(
            "n must be 1 for best-of-n; use best_of for the number of samples", param="n"
        )
    if body.best_of > settings.max_best_of:
        raise ValidationError(f"best_of must be at most {settings.max_best_of}", param="best_of")
    sample = ChatCompletionRequest.model_validate(
        body.model_dump(exclude={"best_of", "n"}) | {"n": body.best_of}
    )
    drawn = await generator.chat(sample)
    texts = [c.message.content for c in drawn.choices]
    nonempty = [i for i, t in enumerate(texts) if t.strip()]
    scores = None
    best = nonempty[0] if nonempty else 0
    if len(nonempty) >= 2:
        prompt = "\n\n".join(m.content for m in body.messages if m.role != "assistant")
        ranked = await ranker.rank(
            RankRequest(items=[RankItem(prompt=prompt, candidates=[texts[i] for i in nonempty])])
        )
        result = ranked.results[0]
        best = nonempty[result.best_index]
        scores = result.scores
    chosen = drawn.choices[best]
    response.headers[VERSION_HEADER] = drawn.weight_version
    return BestOfChatResponse(
        id=drawn.id,
        model=drawn.model,
        choices=[
            ChatCompletionChoice(
                index=0, message=chosen.message, finish_reason=chosen.finish_reason
            )
        ],
        usage=drawn.usage,
        weight_version=drawn.weight_version,
        best_of=body.best_of,
        ranker_scores=scores,
    )

"""Best-of-n serving: OpenAI-compatible chat completions that return the ranker's best of `best_of`.

The recipe's strongest AlpacaEval 2.0 figure (34.86) came from PairRM best-of-16 over the final
policy; this route is that, as a service.

Errors: bad input is a 400 that says what to fix (an empty user message included: the ranker needs
a prompt); a generator or ranker that cannot be reached, or is loading, is a 503 with Retry-After;
one that fails or answers outside its contract is a 502. Never a 500 for an upstream's trouble.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import pydantic
from fastapi import APIRouter, Response

from orchestrator.api.deps import GeneratorDep, RankerDep, SettingsDep
from orchestrator.api.schemas import BestOfChatRequest, BestOfChatResponse
from orchestrator.clients.base import ServiceUnreachableError
from pairloop.contracts.generator import VERSION_HEADER, ChatCompletionChoice, ChatCompletionRequest
from pairloop.contracts.ranker import RankItem, RankRequest
from pairloop.errors import (
    BadGatewayError,
    ClientError,
    ServerError,
    ServiceUnavailableError,
    ValidationError,
)
from pairloop.http import error_responses

router = APIRouter(prefix="/v1", tags=["best-of-n"])

T = TypeVar("T")

# What a client waits before retrying when an upstream is down: about a service restart on CPU.
RETRY_AFTER_S = 10


async def _upstream(what: str, call: Awaitable[T]) -> T:
    """Await `call` to the generator or ranker; its failures as 4xx (ours to fix) or 502/503."""
    try:
        return await call
    except ClientError:
        raise  # the upstream refused what the caller sent (max_tokens too large...): a 400
    except ServiceUnavailableError as exc:
        raise ServiceUnavailableError(
            f"the {what} is not available: {exc.message}; retry later", retry_after=RETRY_AFTER_S
        ) from None
    except ServiceUnreachableError as exc:  # no answer through every retry (or 5xx each time)
        raise ServiceUnavailableError(
            f"the {what} is unreachable: {exc.message}; retry later", retry_after=RETRY_AFTER_S
        ) from None
    except ServerError as exc:
        raise BadGatewayError(f"the {what} failed: {exc.message}") from None
    except pydantic.ValidationError as exc:
        raise BadGatewayError(f"the {what} answered outside its contract: {exc}") from None


@router.post(
    "/chat/completions",
    response_model=BestOfChatResponse,
    responses=error_responses(400, 413, 502, 503),
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
    # The prompt the ranker judges against: empty, nothing can be ranked (nor asked).
    prompt = "\n\n".join(m.content for m in body.messages if m.role != "assistant")
    if not prompt.strip():
        raise ValidationError(
            "the user message is empty: put the question in a user message's content",
            param="messages",
        )
    sample = ChatCompletionRequest.model_validate(
        body.model_dump(exclude={"best_of", "n"}) | {"n": body.best_of}
    )
    drawn = await _upstream("generator", generator.chat(sample))
    texts = [c.message.content for c in drawn.choices]
    nonempty = [i for i, t in enumerate(texts) if t.strip()]
    scores = None
    best = nonempty[0] if nonempty else 0
    if len(nonempty) >= 2:
        request = RankRequest(
            items=[RankItem(prompt=prompt, candidates=[texts[i] for i in nonempty])]
        )
        ranked = await _upstream("ranker", ranker.rank(request))
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

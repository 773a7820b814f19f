"""pairloop's ranker service: PairRM (llm-blender) and other rankers behind one HTTP API.

    python -m services.ranker --model llm-blender/PairRM --port 8001

    POST /v1/rank     items {prompt, candidates[]} -> scores, ranks, best/worst index (full|bubble)
    POST /v1/compare  items {prompt, a, b}         -> probability that a beats b (both orders)
    POST /v1/select   items {prompt, candidates[]} -> the best (or worst) candidate
    GET  /health  /ready  /metrics

Layout: `settings.py` (flags/env), `app.py` (create_app, lifespan), `routes.py` + `deps.py`,
`service.py` (caps, metrics, the backend's lifetime), `batching.py` (cross-request, length-aware
micro-batching), `rankers/` (the `Ranker` protocol, registry and backends: pairrm, reward-model,
scorer), `blender_adapter.py` (the only llm-blender import, with its transformers-5 shims),
`score_functions.py` (programmatic scoring functions shipped for the demo; the `scorer` backend
that serves any such function is `rankers/function_scorer.py`).
"""

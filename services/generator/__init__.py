"""The pairloop generator service: vLLM behind an OpenAI-compatible API, with in-place weight swaps.

    python -m services.generator --model DIR_OR_HF_NAME --port 8000 --model-root DIR --admin-token T

Layout: `settings` (flags/env), `engine` (the only vLLM importer), `gate` (version-exact swap lock),
`generation` (requests through the gate), `serving` (OpenAI formats, SSE), `swap` (validated
in-place reload with rollback), `metrics`, `app` (lifespan, wiring), `routes/` (thin handlers).
"""

"""The orchestrator's HTTP API: run status and control, and best-of-n chat completions."""

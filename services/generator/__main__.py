"""Entry point: `python -m services.generator --model DIR_OR_HF_NAME --port N --model-root DIR --admin-token T`.

Every flag is also an environment variable (`PAIRLOOP_GENERATOR_<FLAG>`); `--help` lists them.
The `if __name__ == "__main__"` guard is required: vLLM spawns its engine process with
multiprocessing's spawn method, which re-imports this module in the child.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from pairloop.logs import configure_logging
    from pairloop.settings import load_settings
    from services.generator.app import create_app
    from services.generator.settings import GeneratorSettings

    settings = load_settings(GeneratorSettings, sys.argv[1:] if argv is None else argv)
    log = configure_logging("generator", settings.log_level)
    exit_code = 0

    def on_fatal() -> None:
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep pairloop's one-line format (configure_logging)
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    log.info(
        "starting generator on http://%s:%d for %s (swaps: %s, admin: %s)",
        settings.host,
        settings.port,
        settings.model,
        settings.model_root or "disabled",
        "on" if settings.admin_token else "disabled",
    )
    server.run()
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())

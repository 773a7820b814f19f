"""Run the ranker service: `python -m services.ranker --model DIR_OR_HF_NAME --port N`.

    python -m services.ranker                                   # llm-blender/PairRM on cpu, :8001
    python -m services.ranker --model /models/tiny-pairrm --port 8102 --batch-wait-ms 5
    python -m services.ranker --device cuda --dtype bfloat16 --batch-size 64
    python -m services.ranker --devices cuda:all --dtype bfloat16  # one replica per visible GPU
    python -m services.ranker --backend reward-model --model Skywork/Skywork-Reward-V2-Qwen3-0.6B
    python -m services.ranker --backend scorer --model services.ranker.score_functions:concise_and_on_topic
    python -m services.ranker --help                            # every flag (also PAIRLOOP_RANKER_*)

Exits 2 on bad flags, 1 when the model cannot be loaded, 0 on a clean shutdown.
"""

from __future__ import annotations

from collections.abc import Sequence

from pairloop.logs import configure_logging
from pairloop.settings import load_settings
from services.ranker.settings import RankerSettings


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from services.ranker.app import create_app

    settings = load_settings(RankerSettings, argv)
    configure_logging("ranker", settings.log_level)
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=stop)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level.lower(),
            access_log=False,
            log_config=None,  # keep pairloop's one-line log format
        )
    )
    server.run()
    return 1 if app.state.service.error is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Logging set-up shared by the services: one line per record, with the part's name."""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging"]


def configure_logging(name: str, level: str = "INFO") -> logging.Logger:
    """Configure the root logger once for a process named `name` and return that part's logger."""
    root = logging.getLogger()
    if not any(getattr(h, "_pairloop", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
        )
        # A mark on our own handler, so a second call does not add another one.
        handler._pairloop = True  # type: ignore[attr-defined]  # our attribute, not logging's
        root.addHandler(handler)
    root.setLevel(level.upper())
    return logging.getLogger(name)

"""The local stack: any run config on one machine, its services as local processes.

    pairloop run CONFIG --local          # start what CONFIG needs, run, stop it all
    pairloop resume RUN_DIR --local      # restart that stack and continue the run

`stack` starts and stops the services (`LocalStack`, `StackSpec.from_config`), `runner` executes
a run on them (`run_local`), `secrets` keeps the admin token a resume needs (0600).
"""

from __future__ import annotations

from orchestrator.local.runner import LOCAL_DIR, STACK_FILE, run_local, run_until_signal
from orchestrator.local.stack import LocalStack, StackSpec, wait_for_worker

__all__ = [
    "LOCAL_DIR",
    "STACK_FILE",
    "LocalStack",
    "StackSpec",
    "run_local",
    "run_until_signal",
    "wait_for_worker",
]

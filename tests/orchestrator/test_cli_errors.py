"""CLI errors are one message with the next step; `--debug` (anywhere on the line) adds the traceback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pairloop_local.processes import free_port


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_unreachable_generator_message_then_traceback_with_debug(
    write_config: Callable[..., Path], store: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_config(services={"generator_urls": [dead], "retries": 0})

    plain = run_cli("run", str(config), "--run-id", "plain")
    assert plain.returncode == 1, plain.stdout + plain.stderr
    (line,) = plain.stderr.strip().splitlines()
    assert line.startswith("error: generator at " + dead) and "Connection refused" in line
    assert f"`pairloop resume {store / 'runs' / 'plain'}` continues it" in line
    assert "Traceback" not in plain.stdout + plain.stderr

    debug = run_cli("run", str(config), "--run-id", "debug", "--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ServiceUnreachableError" in debug.stderr


def test_a_bad_config_is_exit_status_2_without_traceback(write_config: Callable[..., Path]) -> None:
    done = run_cli("run", str(write_config(sampling={"temperature": 9})))
    assert done.returncode == 2
    assert "sampling.temperature" in done.stderr and "Traceback" not in done.stderr


def test_a_malformed_prompt_file_names_its_line_and_offers_no_resume(
    write_config: Callable[..., Path], prompts_file: Path
) -> None:
    with prompts_file.open("a") as fh:
        fh.write('{"prompt_id": "bad", prompt: "no quotes"}\n')
    done = run_cli("run", str(write_config()))
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"{prompts_file} line 51 is not valid JSON" in line
    assert "resume" not in line and "continues" not in line and "Traceback" not in line

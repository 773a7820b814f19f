"""`pairloop demo` on a shared workdir: one demo at a time, a base model that is built or absent
(never half-written), and run ids that two demos started in the same second do not share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.demo import DemoLockedError, run_demo
from orchestrator.manifest import load_manifest
from orchestrator.runs import create_run
from pairloop_local.tiny_models import build_tiny_chat_model, is_built


def test_second_demo_in_a_workdir_names_the_holder_and_builds_nothing(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from orchestrator.demo import demo_lock\n"
            f"with demo_lock(Path({str(tmp_path)!r})):\n"
            "    print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(DemoLockedError, match=rf"pid {holder.pid}\b"):
            run_demo(tmp_path, iterations=1)
        assert not (tmp_path / "store").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_kill9_mid_build_leaves_no_built_model_and_the_next_build_completes(
    tmp_path: Path,
) -> None:
    out = tmp_path / "store" / "models" / "tiny-llama"
    # The build is killed (SIGKILL, by itself) right after the weights and config.json are
    # written, before the tokenizer: the moment the old marker (config.json) said "built".
    script = textwrap.dedent(
        f"""
        import os, signal
        from transformers import PreTrainedTokenizerBase
        from pairloop_local.tiny_models import build_tiny_chat_model

        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        PreTrainedTokenizerBase.save_pretrained = die
        build_tiny_chat_model({str(out)!r}, arch="llama", seed=0)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert not is_built(out) and not (out / "config.json").exists()
    assert list(out.parent.glob(".tiny-llama.staging-*"))  # the half-build is only in staging

    build_tiny_chat_model(out, arch="llama", seed=0)
    assert is_built(out) and (out / "tokenizer.json").is_file()
    assert not list(out.parent.glob(".tiny-llama.staging-*"))


def test_two_runs_created_in_the_same_second_get_their_own_directories(
    write_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    import orchestrator.runs

    # The same second for both, whatever the machine's speed.
    monkeypatch.setattr(orchestrator.runs.time, "strftime", lambda *a: "20261202-120000")
    config = write_config()
    first, second = create_run(config), create_run(config)
    assert first != second
    assert load_manifest(first).run_id != load_manifest(second).run_id
    assert os.path.basename(first).startswith("run-20261202-120000")

"""`pairloop run CONFIG --local` / `pairloop resume RUN_DIR --local` as a user runs them: the CLI as a
real process that starts its own stack (vLLM generator, ranker, Celery worker, redis-server),
interrupted by SIGTERM and by `kill -9` at seeded moments, and a Redis restarted under a run.

Every interrupted or disturbed run must end with the artifacts of one undisturbed run of the same
config (`reference`, run once on the session stack): the same datasets, bit-equal trained weights
and the same evaluation figures. Bit-equal is the right bar: generation is seeded per prompt and
sent one shard at a time (`services.concurrency: 1`), the ranker is a deterministic scorer, and
training is seeded and resumes from its checkpoints with their RNG states, all on CPU.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import yaml
from safetensors.torch import load_file

from orchestrator.demo import demo_config
from orchestrator.local import LocalStack
from orchestrator.manifest import load_manifest
from pairloop.preference_data import load_rows, split_path
from pairloop_local.processes import free_port, wait_until
from pairloop_local.redis_server import start_redis

pytestmark = pytest.mark.timeout(1200)

ITERATIONS = 2
SPLITS = [f"{s}_iteration_{k}" for k in range(1, ITERATIONS + 1) for s in ("train", "test")]


def small_config(
    path: Path, *, store: Path, base_model: Path, local: dict[str, Any] | None = None, **over: Any
) -> Path:
    """The demo's config, cut down: 24 prompts x 2 iterations, 3 shards, 6 DPO steps a job."""
    cfg = demo_config(store=store, base_model=base_model, iterations=ITERATIONS)
    cfg["prompts"].update(per_iteration=24, eval_prompts=8)
    cfg["shard_size"] = 8
    cfg["dpo"]["save_steps"] = 2  # checkpoints at steps 2 and 4: a killed job resumes from one
    # One shard in flight at a time: the engine sees the same batches in every run.
    cfg["services"]["concurrency"] = 1
    cfg["local"]["redis"] = "private"
    cfg["local"].update(local or {})
    for key, value in over.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env(fault: str | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, COLUMNS="200", **extra)
    env.pop("PAIRLOOP_ORCHESTRATOR_FAULT_KILL_AFTER", None)
    if fault:
        env["PAIRLOOP_ORCHESTRATOR_FAULT_KILL_AFTER"] = fault
    return env


def pairloop(
    *args: str, fault: str | None = None, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=cli_env(fault, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def stack_survivors(run_dir: Path) -> list[psutil.Process]:
    """Live processes of the stack the last `--local` CLI started for `run_dir`."""
    info = json.loads((run_dir / "local" / "stack.json").read_text())
    groups, reaper = set(info["process_groups"]), info["reaper_pid"]
    alive = []
    for proc in psutil.process_iter():
        try:
            if (os.getpgid(proc.pid) in groups or proc.pid == reaper) and proc.status() not in (
                psutil.STATUS_ZOMBIE,
                psutil.STATUS_DEAD,
            ):
                alive.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return alive


def wait_running(proc: subprocess.Popen[str], predicate: Any, *, timeout: float, what: str) -> None:
    """wait_until(predicate), failing at once with the CLI's output if the CLI exits first."""

    def check() -> bool:
        if predicate():
            return True
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the CLI exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        return False

    wait_until(check, timeout=timeout, interval=0.02, what=what)


def assert_stack_gone(run_dir: Path, *, within: float = 10.0) -> None:
    """No process of the stack is alive `within` seconds from now (by process group and pid)."""
    try:
        wait_until(lambda: not stack_survivors(run_dir), timeout=within, what="stack gone")
    except TimeoutError:
        left = [(p.pid, " ".join(p.cmdline())[:120]) for p in stack_survivors(run_dir)]
        pytest.fail(f"stack processes still alive {within:.0f}s after the CLI died: {left}")


def assert_same_artifacts(run_dir: Path, reference: Path, *, same_judge: bool = True) -> None:
    """Datasets, trained weights and evaluation figures equal the undisturbed run's; with another
    judge (`same_judge=False`), the evaluated answers (figures are that judge's own)."""
    for split in SPLITS:
        ours = load_rows(split_path(run_dir / "dataset", split))
        theirs = load_rows(split_path(reference / "dataset", split))
        assert len({r["prompt_id"] for r in ours}) == len(ours), split  # nothing duplicated
        assert ours == theirs, split
    for k in range(1, ITERATIONS + 1):
        ours = load_file(run_dir / "checkpoints" / f"policy{k}" / "model.safetensors")
        theirs = load_file(reference / "checkpoints" / f"policy{k}" / "model.safetensors")
        assert ours.keys() == theirs.keys()
        assert all((ours[n] == theirs[n]).all() for n in theirs), f"policy{k} weights differ"
    if not same_judge:
        answers = sorted(p.relative_to(reference) for p in reference.glob("eval/**/*outputs.json"))
        assert len(answers) == 2 * (ITERATIONS + 1)  # plain and best-of-4 of every policy
        for path in answers:
            ours, theirs = (json.loads((root / path).read_text()) for root in (run_dir, reference))
            assert [(o["instruction"], o["output"]) for o in ours] == [
                (o["instruction"], o["output"]) for o in theirs
            ], path
        return
    m, ref = load_manifest(run_dir), load_manifest(reference)
    for k in range(0, ITERATIONS + 1):
        name = "policy0.evaluate" if k == 0 else f"iter{k}.evaluate"
        # `judge` is the judging ranker's address, which differs between stacks by design.
        ours = {k: v for k, v in m.stages[name].metrics.items() if k != "judge"}
        theirs = {k: v for k, v in ref.stages[name].metrics.items() if k != "judge"}
        assert ours == theirs, name


@pytest.fixture(scope="session")
def local_store(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    """A model store with the tiny base model, shared by the local runs (each has its run id)."""
    import shutil

    store = tmp_path_factory.mktemp("local-store")
    shutil.copytree(tiny_models["llama"], store / "models" / "base")
    return store


@pytest.fixture(scope="session")
def reference(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One undisturbed run of the small config, on the session's stack (no extra start-up)."""
    tmp = tmp_path_factory.mktemp("local-ref")
    config = small_config(
        tmp / "ref.yaml",
        store=stack.spec.store,
        base_model=stack.spec.base_model,
        services={
            "generator_urls": [stack.generator_url],
            "ranker_url": stack.ranker_url,
            "redis_url": stack.redis_url,
        },
    )
    done = pairloop(
        "run",
        str(config),
        "--run-id",
        "local-reference",
        PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN=stack.admin_token,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = stack.spec.store / "runs" / "local-reference"
    assert load_manifest(run_dir).status == "completed"
    return run_dir


def seeded_kills(seed: int) -> list[str]:
    """Three kill points, one in each of generation, ranking and training, in run order.

    Generation and ranking write 3 shards an iteration: kill after shard 1 or 2. Training reports
    steps 0..6 (one event each): events 4..6 are steps 3..5, after the step-2 checkpoint was
    complete, so the resumed job starts from a checkpoint rather than from step 0.
    """
    rng = random.Random(seed)
    points = [
        (rng.randint(1, ITERATIONS), 0, f"generate:{rng.randint(1, 2)}"),
        (rng.randint(1, ITERATIONS), 1, f"rank:{rng.randint(1, 2)}"),
        (rng.randint(1, ITERATIONS), 2, f"train:{rng.randint(4, 6)}"),
    ]
    return [f"iter{k}.{what}" for k, _, what in sorted(points)]


def test_sigterm_then_kill9_at_seeded_moments_resume_local_equals_undisturbed(
    local_store: Path, reference: Path, tmp_path: Path
) -> None:
    config = small_config(
        tmp_path / "killed.yaml", store=local_store, base_model=local_store / "models" / "base"
    )
    run_dir = local_store / "runs" / "killed"

    # SIGTERM once the loop runs: everything stops in order, the run says interrupted.
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(config), "--local", "--run-id", "killed"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_running(
            proc,
            lambda: (
                (run_dir / "manifest.json").is_file() and load_manifest(run_dir).status == "running"
            ),
            timeout=600,
            what="the run to start",
        )
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert f"pairloop resume {run_dir} --local" in err and "Traceback" not in out + err
    assert load_manifest(run_dir).status == "interrupted"
    assert_stack_gone(run_dir, within=1.0)  # stopped before the CLI exited
    assert (run_dir / "local" / "secrets.json").stat().st_mode & 0o777 == 0o600

    kills = seeded_kills(seed=14)
    print("kill -9 points:", kills)
    for fault in kills:
        killed = pairloop("resume", str(run_dir), "--local", fault=fault)
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        stage = fault.split(":")[0]
        assert load_manifest(run_dir).stages[stage].state == "running", fault
        assert_stack_gone(run_dir, within=10.0)

    last = pairloop("resume", str(run_dir), "--local")
    assert last.returncode == 0, last.stdout + last.stderr
    assert_stack_gone(run_dir, within=1.0)
    m = load_manifest(run_dir)
    assert m.status == "completed"
    train_kill = next(f for f in kills if ".train:" in f).split(":")[0]
    assert m.stages[train_kill].metrics["resumed_from_step"] > 0  # from a checkpoint, not step 0
    assert_same_artifacts(run_dir, reference)
    # The admin token lives only in the 0600 secrets file.
    token = json.loads((run_dir / "local" / "secrets.json").read_text())["generator_admin_token"]
    for public in ("config.yaml", "manifest.json"):
        assert token not in (run_dir / public).read_text()


def _restart(handle: Any, data: Path, port: int) -> Any:
    handle.process.kill()  # SIGKILL: no shutdown save either
    return start_redis(data, port=port, persist=False)


def test_redis_restarted_in_generation_ranking_and_training_run_completes_equal(
    local_store: Path, reference: Path, tmp_path: Path
) -> None:
    port = free_port()
    data = tmp_path / "redis"
    handle = start_redis(data, port=port, persist=False)
    url = handle.url
    config = small_config(
        tmp_path / "redis.yaml",
        store=local_store,
        base_model=local_store / "models" / "base",
        local={"redis": url},
    )
    run_dir = local_store / "runs" / "redis-restarts"
    argv = ["run", str(config), "--local", "--run-id", "redis-restarts"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *argv],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )

    def stage(name: str) -> Any:
        if not (run_dir / "manifest.json").is_file():
            return None
        return load_manifest(run_dir).stages.get(name)

    try:
        # 1. Down from the first generation shard until ranking has run: an outage spanning both.
        wait_running(
            proc,
            lambda: (run_dir / "iter1" / "generations" / "shard-00000.jsonl").is_file(),
            timeout=600,
            what="first generation shard",
        )
        handle.process.kill()
        down_at = time.time()
        assert stage("iter1.generate").state == "running"
        wait_running(
            proc,
            lambda: (st := stage("iter1.rank")) is not None and st.state in ("running", "done"),
            timeout=120,
            what="ranking to start while Redis is down",
        )
        handle = start_redis(data, port=port, persist=False)
        assert down_at < stage("iter1.rank").started_at  # ranking ran during the outage

        # 2. Killed and restarted empty while the worker trains (its state and queue are lost).
        job_key = "celery-task-meta-redis-restarts-iter1"

        def training() -> bool:
            raw = redis.Redis.from_url(url).get(job_key)
            return raw is not None and json.loads(raw)["status"] == "PROGRESS"

        wait_running(proc, training, timeout=300, what="training progress in Redis")
        # The worker rewrites its job's key as soon as Redis is back, so a key only this test
        # writes is what proves the restarted server came up empty.
        redis.Redis.from_url(url).set("pairloop-test-sentinel", "1")
        handle.process.kill()
        assert stage("iter1.train").state == "running"
        time.sleep(2.0)  # the outage itself (a fault we inject, not a wait for a condition)
        handle = start_redis(data, port=port, persist=False)
        assert not redis.Redis.from_url(url).exists("pairloop-test-sentinel")  # all lost

        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        handle.stop()
    assert proc.returncode == 0, out + err
    assert "Traceback" not in out + err
    assert load_manifest(run_dir).status == "completed"
    assert_same_artifacts(run_dir, reference)


# --- connection refused: one line on stderr, the next step, no traceback -----------------------


def _refused_config(tmp: Path, stack: LocalStack, **services: Any) -> Path:
    base = {
        "generator_urls": [stack.generator_url],
        "ranker_url": stack.ranker_url,
        "redis_url": stack.redis_url,
        "retries": 1,
        "broker_outage_s": 2,
    }
    return small_config(
        tmp / "refused.yaml",
        store=stack.spec.store,
        base_model=stack.spec.base_model,
        services={**base, **services},
    )


@pytest.mark.parametrize("service", ["generator", "ranker", "redis"])
def test_connection_refused_is_one_line_error(
    stack: LocalStack, tmp_path: Path, service: str
) -> None:
    dead = free_port()
    override = {
        "generator": {"generator_urls": [f"http://127.0.0.1:{dead}"]},
        "ranker": {"ranker_url": f"http://127.0.0.1:{dead}"},
        # With a password: it must not reach the terminal or the manifest (pairloop.redact).
        "redis": {"redis_url": f"redis://:hunter2-secret@127.0.0.1:{dead}/0"},
    }[service]
    config = _refused_config(tmp_path, stack, **override)
    run_id = f"refused-{service}"
    done = pairloop(
        "run",
        str(config),
        "--run-id",
        run_id,
        PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN=stack.admin_token,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    line = lines[0]
    assert str(dead) in line and "refused" in line.lower(), line
    assert f"pairloop resume {stack.spec.store / 'runs' / run_id}" in line, line
    manifest = load_manifest(stack.spec.store / "runs" / run_id)
    assert manifest.status == "failed"
    assert "hunter2" not in done.stdout + done.stderr + (manifest.error or "")


# --- supervision: a killed service is restarted and the run carries on --------------------------


SUPERVISED = ["--run-id", "supervised"]


def test_generator_killed_mid_generation_is_restarted_and_the_run_completes_equal(
    local_store: Path, reference: Path, tiny_reward_model: Path, tmp_path: Path
) -> None:
    # With `local.judge`: a reward model judges, the demo's scorer (the run's ranker) picks.
    config = small_config(
        tmp_path / "supervised.yaml",
        store=local_store,
        base_model=local_store / "models" / "base",
        local={"judge": {"model": str(tiny_reward_model)}},
    )
    run_dir = local_store / "runs" / "supervised"
    # Killed in iteration 2, after a seeded shard: the next shard's request is in flight, and the
    # restarted generator must come back on policy 1, not on the base weights it starts with.
    shard = random.Random(19).randint(0, 1)
    written = run_dir / "iter2" / "generations" / f"shard-{shard:05d}.jsonl"
    # Inherited settings that would expose the services: the stack must not pass them on.
    env = cli_env(PAIRLOOP_GENERATOR_HOST="0.0.0.0", PAIRLOOP_RANKER_HOST="0.0.0.0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(config), "--local", *SUPERVISED],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_running(proc, written.is_file, timeout=900, what=f"iter2 shard {shard} written")
        info = json.loads((run_dir / "local" / "stack.json").read_text())
        killed = info["services"]["generator"]
        for name in ("generator", "ranker", "judge"):
            listening = {
                c.laddr.ip
                for c in psutil.Process(info["services"][name]).net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            }
            assert listening == {"127.0.0.1"}, (name, listening)
        os.killpg(killed, signal.SIGKILL)
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert "generator exited (killed by signal 9); restarting it" in out, out
    assert "generator restarted and ready" in out, out
    assert "Traceback" not in out + err
    assert_stack_gone(run_dir, within=1.0)
    restarted = json.loads((run_dir / "local" / "stack.json").read_text())["services"]["generator"]
    assert restarted != killed
    m = load_manifest(run_dir)
    assert m.status == "completed"
    assert_same_artifacts(run_dir, reference, same_judge=False)
    # The judge that local.judge started judged every row, best-of-4 included: not self-judged.
    judge = f"reward model {tiny_reward_model}"
    assert f"judge {info['judge_url']}" in out
    for name in ("policy0.evaluate", "iter1.evaluate", "iter2.evaluate"):
        metrics = m.stages[name].metrics
        assert (metrics["judge"], metrics["judge_is_run_ranker"]) == (judge, False), name
        row = metrics["best_of"]["4"]
        assert (row["picked_by"], row["judge"], row["self_judged"]) == (
            "scorer plain_prose",
            judge,
            False,
        ), name
    report = (run_dir / "report" / "report.md").read_text()
    assert f"{judge}, a separate ranker service" in report
    best_of_rows = [line for line in report.splitlines() if line.startswith("| 2 | 4 |")]
    assert len(best_of_rows) == 1 and best_of_rows[0].endswith("| no |"), report
    # The private Redis's password lives only in the 0600 secrets file.
    secrets_file = run_dir / "local" / "secrets.json"
    assert secrets_file.stat().st_mode & 0o777 == 0o600
    password = json.loads(secrets_file.read_text())["redis_password"]
    for public in ("config.yaml", "manifest.json", "local/stack.json"):
        assert password not in (run_dir / public).read_text(), public
    assert password not in out + err

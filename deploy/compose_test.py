"""`make compose-test`: build the CPU images and run the compose stack end to end, for real.

    make compose-test                       # = .venv/bin/python deploy/compose_test.py
    PAIRLOOP_COMPOSE_TEST_KEEP=1 make compose-test    # leave the stack up afterwards to inspect it

With `docker compose -f docker-compose.yml -f docker-compose.cpu.yml` (project pairloop-compose-test,
so a user's own `pairloop` stack is left alone), it checks:
1. a missing secret file name fails `docker compose config` with a message naming it;
2. `build`, then `up`: every service becomes healthy, in compose's start order;
3. the orchestrator's run (2 iterations of the tiny demo) completes through two faults, made while
   it runs (never paused): the trainer container dies of SIGKILL while iteration 1's job is
   verifiably training past a checkpoint (its progress, as Redis publishes it), then Redis is
   restarted while the orchestrator waits on that job. It fails unless Docker's restart policy
   brought the trainer back, the job was sent again and resumed from that checkpoint (the
   trainer's own progress and the orchestrator's manifest say so), and nothing was redone;
4. the run directory on the volume holds the datasets (loaded with `datasets.load_dataset`) and the
   report; the API, on its published port, lists the run and answers a best-of-n chat completion;
5. an undisturbed run of the same config on the same stack ends with the same artifacts: the same
   datasets, bit-equal trained weights, the same evaluation figures (the bar of the local
   stack's kill tests, tests/orchestrator/test_local_stack.py);
6. `down` (volumes kept) then `up`: the orchestrator resumes the finished run and redoes nothing;
7. `down -v` leaves no container, volume or network of the project.
It prints each phase's time and each image's size; on failure, the failing services' last log lines.
Setup of Docker, Compose, base image and wheelhouse: deploy/compose_env.py (installs only in CI).
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compose_env
from compose_env import REPO, Daemon, Missing, in_ci, log

PROJECT = "pairloop-compose-test"
FILES = ["docker-compose.yml", "docker-compose.cpu.yml"]
RUN_ID = "tiny-demo"  # docker-compose.cpu.yml's orchestrator command
REFERENCE_ID = "tiny-demo-undisturbed"  # the same config, run again without faults
CONFIG = "configs/tiny-demo-compose.yaml"  # what that command runs
SECRETS = ("admin_token", "api_token", "redis_password")
SERVING = ["redis", "generator", "ranker", "trainer", "api"]  # long-running, health-checked
IMAGES = [
    "pairloop/generator-cpu:0.1.0",
    "pairloop/ranker-cpu:0.1.0",
    "pairloop/trainer-cpu:0.1.0",
    "pairloop/orchestrator:0.1.0",
]
HEALTHY_WITHIN = 900.0  # cold start on 2 busy cores: vLLM's engine, PairRM-less ranker, Celery
RUN_WITHIN = 900.0
RESUME_WITHIN = 600.0


class Timings(dict[str, float]):
    """Phase -> seconds, each logged as it ends (a failed run still shows how far it got)."""

    def __setitem__(self, phase: str, seconds: float) -> None:
        super().__setitem__(phase, seconds)
        log(f"{phase}: {seconds:.0f}s")


class Failed(RuntimeError):
    """A check of the stack failed; `services` are the ones whose logs explain it."""

    def __init__(self, message: str, services: list[str] | None = None) -> None:
        super().__init__(message)
        self.services = services or []


class Stack:
    """`docker compose -p pairloop-compose-test -f ... -f ...` with this run's environment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        # --env-file /dev/null: a user's .env (their own stack's settings) never leaks in here.
        files = [a for f in FILES for a in ("-f", f)]
        self.base = ["docker", "compose", "--env-file", os.devnull, "-p", PROJECT, *files]

    def __call__(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.base, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env=self.env,
        )
        if check and proc.returncode != 0:
            raise Failed(
                f"docker compose {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        return proc

    def stream(self, *args: str, timeout: float) -> None:
        """A long command (build) whose output is shown as it comes, with a deadline."""
        proc = subprocess.Popen(
            [*self.base, *args],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        tail: list[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail = ([*tail, line.rstrip()])[-60:]
                if not line.startswith("#") or re.match(r"#\d+ (\[|DONE|CACHED|ERROR)", line):
                    print("   ", line.rstrip(), flush=True)
        finally:
            timer.cancel()
        if proc.wait() != 0:
            raise Failed(
                f"docker compose {' '.join(args)} exited {proc.returncode} (killed after {timeout:.0f}s if -9):\n"
                + "\n".join(tail)
            )

    def ps(self) -> dict[str, dict[str, Any]]:
        """Service -> its container's state (State, Health, ExitCode), all containers included."""
        out = self("ps", "-a", "--format", "json", timeout=60).stdout.strip()
        rows = (
            json.loads(out)
            if out.startswith("[")
            else [json.loads(line) for line in out.splitlines() if line.strip()]
        )
        return {r["Service"]: r for r in rows}

    def restarts(self) -> dict[str, int]:
        """Service -> how often Docker restarted its container (a crash loop shows here first)."""
        ids = self("ps", "-aq", timeout=60).stdout.split()
        if not ids:
            return {}
        fmt = '{{index .Config.Labels "com.docker.compose.service"}} {{.RestartCount}}'
        out = subprocess.run(
            ["docker", "inspect", "--format", fmt, *ids],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
        ).stdout
        return {name: int(n) for name, n in (line.split() for line in out.splitlines() if line)}

    def logs(self, service: str, tail: int) -> str:
        return self(
            "logs", "--no-color", "--tail", str(tail), service, timeout=60, check=False
        ).stdout


def wait_healthy(
    stack: Stack, services: list[str], within: float, restarts: dict[str, int] | None = None
) -> dict[str, float]:
    """Seconds until each service is healthy; fails at once when a container exits or is unhealthy,
    or was restarted by Docker more often than `restarts` (the faults' own restarts) allows."""
    start, ready = time.monotonic(), {}
    allowed = restarts or {}
    polls = 0
    while True:
        polls += 1
        ps = stack.ps()
        if polls % 5 == 0:
            crashed = {
                n: c for n, c in stack.restarts().items() if c > allowed.get(n, 0) and n in services
            }
            if crashed:
                raise Failed(f"restarted by Docker (crashed): {crashed}", list(crashed))
        for name in services:
            row = ps.get(name)
            if row is None or name in ready:
                continue
            if row.get("State") == "restarting" and name not in allowed:
                raise Failed(
                    f"{name} is crash-looping (restarting) before it became healthy", [name]
                )
            if row.get("State") in ("exited", "dead"):
                raise Failed(
                    f"{name} exited with code {row.get('ExitCode')} before it became healthy",
                    [name],
                )
            if row.get("Health") == "unhealthy":
                raise Failed(f"{name} is unhealthy", [name])
            if row.get("Health") == "healthy":
                ready[name] = time.monotonic() - start
                log(f"{name} healthy after {ready[name]:.0f}s")
        init = ps.get("models-init")
        if init and init.get("State") == "exited" and init.get("ExitCode") != 0:
            raise Failed(f"models-init exited with code {init.get('ExitCode')}", ["models-init"])
        if len(ready) == len(services):
            return ready
        if time.monotonic() - start > within:
            late = [s for s in services if s not in ready]
            raise Failed(
                f"not healthy within {within:.0f}s: {', '.join(late)} ({[ps.get(s, {}).get('Status') for s in late]})",
                late,
            )
        time.sleep(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Api:
    """The orchestrator API through its published port."""

    def __init__(self, port: int, token: str) -> None:
        import httpx

        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        self.token = token

    def run(self) -> dict[str, Any] | None:
        r = self.client.get(f"/runs/{RUN_ID}")
        return None if r.status_code == 404 else r.raise_for_status().json()


def stage_state(run: dict[str, Any] | None, stage: str) -> str:
    return ((run or {}).get("stages") or {}).get(stage, {}).get("state", "pending")


class ProgressWatch:
    """Every state the training jobs store, as Redis publishes it: Celery's Redis backend PUBLISHes
    each task state it writes on the key's channel. `redis-cli PSUBSCRIBE` runs in the Redis
    container (its port is not published); a Redis restart ends it, `start` subscribes again."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.proc: subprocess.Popen[str] | None = None

    def start(self, within: float = 120) -> None:
        """Subscribe (again), returning once Redis confirmed the subscription; events of an
        earlier subscription are dropped. A Redis still loading its file refuses: retried."""
        deadline = time.monotonic() + within
        while True:
            self.stop()
            self.events = queue.Queue()
            subscribed = threading.Event()
            script = (
                'REDISCLI_AUTH="$(cat /run/secrets/redis_password)" '
                "exec redis-cli psubscribe 'celery-task-meta-*'"
            )
            self.proc = subprocess.Popen(
                [*self.stack.base, "exec", "-T", "redis", "sh", "-c", script],
                cwd=REPO,
                env=self.stack.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            threading.Thread(
                target=self._read, args=(self.proc, self.events, subscribed), daemon=True
            ).start()
            if subscribed.wait(timeout=15):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise Failed(f"could not subscribe to Redis within {within:.0f}s", ["redis"])
            time.sleep(1)

    @staticmethod
    def _read(
        proc: subprocess.Popen[str],
        events: queue.Queue[tuple[str, dict[str, Any]]],
        subscribed: threading.Event,
    ) -> None:
        # Not a terminal: redis-cli prints each element of a message on a line of its own:
        # `psubscribe`, pattern, count once, then `pmessage`, pattern, channel, payload (the
        # task's state as JSON, on one line) for each message.
        assert proc.stdout is not None
        lines = iter(proc.stdout)
        for line in lines:
            if line.strip() == "psubscribe":
                subscribed.set()
            if line.strip() != "pmessage":
                continue
            try:
                _pattern, channel, payload = next(lines), next(lines), next(lines)
                meta = json.loads(payload)
            except (StopIteration, ValueError):
                return
            if isinstance(meta, dict):
                events.put((channel.strip().removeprefix("celery-task-meta-"), meta))

    def next(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None


def _config() -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load((REPO / CONFIG).read_text()))


ITERATIONS = int(_config()["iterations"])


def kill_trainer(stack: Stack) -> str:
    """SIGKILL the trainer container's whole process tree at once; return how.

    As the kernel's OOM killer or a crash would: the container's init (PID 1 of its namespace,
    `init: true`) gets SIGKILL from the host, every process of the container dies with it, the
    container exits 137, and its restart policy brings it back. `docker compose kill -s SIGKILL`
    would not do: Docker marks a container it kills itself as stopped by hand and never applies
    its restart policy then (daemon/kill.go). Where the daemon's processes are not ours to signal
    (rootless Docker, a Docker Desktop VM), that is the fallback, and the test restarts the
    container itself.
    """
    (cid,) = stack("ps", "-q", "trainer", timeout=60).stdout.split()
    pid = int(
        subprocess.run(
            ["docker", "inspect", "--format", "{{.State.Pid}}", cid],
            capture_output=True,
            text=True,
            timeout=30,
            env=stack.env,
            check=True,
        ).stdout
    )
    try:
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL to the container's init (host pid {pid})"
    except (PermissionError, ProcessLookupError) as exc:
        log(f"cannot signal host pid {pid} ({exc}): docker compose kill -s SIGKILL + start")
        stack("kill", "-s", "SIGKILL", "trainer", timeout=60)
        stack("start", "trainer", timeout=120)
        return "docker compose kill -s SIGKILL trainer (then start: no restart policy applies)"


def run_with_faults(stack: Stack, api: Api, watch: ProgressWatch) -> dict[str, Any]:
    """The run, with both faults while iteration 1's job trains and the orchestrator runs.

    Returns the finished run (the API's view) with the fault record under "faults".
    """
    start = time.monotonic()
    job = f"{RUN_ID}-iter1"  # pairloop.jobs.TrainJob.job_id
    save_steps = int(_config()["dpo"]["save_steps"])
    in_flight: dict[str, Any] | None = None
    how = ""
    seen: list[str] = []
    next_check = 0.0
    # 1. Wait for the job to train past a complete checkpoint, then kill the trainer at once.
    while in_flight is None:
        event = watch.next(timeout=1.0)
        if event is not None and event[0] == job:
            status, info = event[1].get("status"), event[1].get("result")
            info = info if isinstance(info, dict) else {}
            seen.append(f"{status}:{info.get('phase')}")
            if status in ("SUCCESS", "FAILURE"):
                raise Failed(
                    f"{job} ended ({status}) before it was seen training past a checkpoint: "
                    f"no fault was made in flight (states seen: {seen[-10:]})",
                    ["trainer", "orchestrator"],
                )
            if (
                status == "PROGRESS"
                and info.get("phase") == "training"
                and 0 < info.get("step", 0) < info.get("total_steps", 0)
                and (info.get("checkpoint_step", 0) > 0 or info["total_steps"] <= save_steps)
            ):
                how = kill_trainer(stack)
                in_flight = info
                log(
                    f"{job} at step {info['step']}/{info['total_steps']}, last checkpoint at "
                    f"step {info.get('checkpoint_step', 0)}: trainer killed ({how})"
                )
        if time.monotonic() > next_check:
            next_check = time.monotonic() + 5
            _check_running(stack, api, start)
    killed_at = time.monotonic()
    # 2. Redis restarted while the orchestrator (running, never paused) waits on the job.
    orch = stack.ps().get("orchestrator", {})
    if orch.get("State") != "running":
        raise Failed(f"the orchestrator is {orch.get('State')}, not waiting on {job}")
    t = time.monotonic()
    stack("restart", "redis", timeout=120)
    log(f"redis restarted while the orchestrator waits on {job} ({time.monotonic() - t:.0f}s)")
    watch.start()  # the restart ended the subscription
    # 3. Docker's restart policy brings the trainer back (the kill is its one restart).
    wait_healthy(stack, ["redis", "trainer"], 300, restarts={"trainer": 1})
    restarts = stack.restarts().get("trainer", 0)
    if restarts < 1 and "docker compose kill" not in how:
        raise Failed("the killed trainer was not restarted by its restart policy", ["trainer"])
    log(f"trainer back {time.monotonic() - killed_at:.0f}s after the kill (restarts: {restarts})")
    # 4. The job is delivered again and resumes from the checkpoint it had when it was killed.
    resumed: dict[str, Any] | None = None
    expected = int(in_flight.get("checkpoint_step", 0))
    deadline = time.monotonic() + RUN_WITHIN
    while True:
        event = watch.next(timeout=1.0)
        if event is not None and event[0] == job:
            status, info = event[1].get("status"), event[1].get("result")
            info = info if isinstance(info, dict) else {}
            if status == "PROGRESS" and info.get("phase") == "training" and resumed is None:
                resumed = info
                if int(info.get("resumed_from_step", 0)) != expected:
                    raise Failed(
                        f"{job} was delivered again but resumed from step "
                        f"{info.get('resumed_from_step')}, not from its checkpoint at {expected}",
                        ["trainer"],
                    )
                log(
                    f"{job} delivered again, resumed from step {expected} "
                    f"({time.monotonic() - killed_at:.0f}s after the kill)"
                )
        if time.monotonic() < next_check:
            continue
        next_check = time.monotonic() + 3
        run = api.run() if _api_up(api) else None
        if run is not None and run.get("status") == "completed":
            break
        _check_running(stack, api, start, run)
        if time.monotonic() > deadline:
            raise Failed(f"run not done within {RUN_WITHIN:.0f}s", ["orchestrator", "trainer"])
    if resumed is None:
        log(f"{job}'s resumed training was not seen on the channel (it ran before we resubscribed)")
    # 5. The orchestrator's record: the job's result says it resumed from that checkpoint.
    metrics = run["stages"]["iter1.train"].get("metrics") or {}
    if metrics.get("resumed_from_step") != expected:
        raise Failed(
            f"the manifest's iter1.train says resumed_from_step={metrics.get('resumed_from_step')}"
            f", expected {expected}",
            ["orchestrator"],
        )
    orchestrator_log = stack.logs("orchestrator", 2000)
    resent = f"training job {job} was lost by the broker: sending it again" in orchestrator_log
    received = len(
        re.findall(rf"Task \S+\[{re.escape(job)}\] received", stack.logs("trainer", 5000))
    )
    if not resent and received < 2:
        raise Failed(
            f"no sign that {job} was sent again: the orchestrator did not resend it and the "
            f"trainer's log shows it received {received} time(s)",
            ["orchestrator", "trainer"],
        )
    log(
        f"run {RUN_ID} done after {time.monotonic() - start:.0f}s; {job} resent by the "
        f"orchestrator: {resent}, received by the trainer {received} time(s)"
    )
    run["faults"] = {"killed_at_step": in_flight["step"], "checkpoint_step": expected}
    return run


def _check_running(stack: Stack, api: Api, start: float, run: dict[str, Any] | None = None) -> None:
    """Fail at once when the run failed or the orchestrator exited; at the deadline, too."""
    if run is None and _api_up(api):
        run = api.run()
    status = (run or {}).get("status")
    orch = stack.ps().get("orchestrator", {})
    if orch.get("State") == "exited" and status != "completed" and _api_up(api):
        status = (api.run() or {}).get("status")  # it may have finished since `run` was read
    if (orch.get("State") == "exited" and status != "completed") or status in (
        "failed",
        "cancelled",
    ):
        raise Failed(
            f"orchestrator exited ({orch.get('ExitCode')}); run status {status}: "
            f"{(run or {}).get('error')}",
            ["orchestrator", "trainer", "redis", "generator"],
        )
    if time.monotonic() - start > RUN_WITHIN:
        raise Failed(
            f"run not done within {RUN_WITHIN:.0f}s (status {status})", ["orchestrator", "trainer"]
        )


def _api_up(api: Api) -> bool:
    import httpx

    try:
        return api.client.get("/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def copy_run(stack: Stack, run_id: str, into: Path) -> Path:
    """The run's directory, copied off the `models` volume (through the api container)."""
    stack("cp", f"api:/models/runs/{run_id}", str(into), timeout=300)
    return into / run_id


def run_reference(stack: Stack) -> None:
    """The same config again as another run, with no fault, on the same stack."""
    t = time.monotonic()
    stack(
        "run",
        "--rm",
        "--no-deps",
        "-T",
        "orchestrator",
        f"/configs/{Path(CONFIG).name}",
        REFERENCE_ID,
        timeout=RUN_WITHIN,
    )
    log(f"undisturbed run {REFERENCE_ID} done after {time.monotonic() - t:.0f}s")


def compare_with_reference(stack: Stack) -> None:
    """The faulted run's artifacts equal the undisturbed run's: datasets row for row, trained
    weights bit for bit, evaluation figures (generation is seeded per prompt with one shard in
    flight, the ranker is a deterministic scorer, training resumes with its RNG states)."""
    from safetensors.torch import load_file

    from orchestrator.manifest import load_manifest
    from pairloop.preference_data import load_rows, split_path

    differ = []
    with tempfile.TemporaryDirectory() as tmp:
        ours, ref = copy_run(stack, RUN_ID, Path(tmp)), copy_run(stack, REFERENCE_ID, Path(tmp))
        for k in range(1, ITERATIONS + 1):
            for split in (f"train_iteration_{k}", f"test_iteration_{k}"):
                a = load_rows(split_path(ours / "dataset", split))
                b = load_rows(split_path(ref / "dataset", split))
                if a != b:
                    differ.append(f"dataset {split} ({len(a)} vs {len(b)} rows)")
            wa = load_file(ours / "checkpoints" / f"policy{k}" / "model.safetensors")
            wb = load_file(ref / "checkpoints" / f"policy{k}" / "model.safetensors")
            if wa.keys() != wb.keys() or not all((wa[n] == wb[n]).all() for n in wb):
                differ.append(f"policy{k} weights")
        ma, mb = load_manifest(ours), load_manifest(ref)
        for name in ["policy0.evaluate", *(f"iter{k}.evaluate" for k in range(1, ITERATIONS + 1))]:
            if ma.stages[name].metrics != mb.stages[name].metrics:
                differ.append(f"{name} figures")
    if differ:
        raise Failed(f"the faulted run differs from the undisturbed one: {', '.join(differ)}")
    log(
        f"faulted run = undisturbed run: {ITERATIONS * 2} dataset splits, {ITERATIONS} policies "
        "bit-equal, evaluation figures"
    )


def check_run_dir(stack: Stack, run: dict[str, Any]) -> None:
    """Datasets and report, copied off the volume; the datasets load with datasets.load_dataset."""
    import datasets

    from pairloop.preference_data import PREFERENCE_COLUMNS

    undone = [name for name, st in run["stages"].items() if st["state"] != "done"]
    if undone:
        raise Failed(f"stages not done: {undone}", ["orchestrator"])
    # The restarts redid nothing: iteration 1's job ran once, its result came back through Redis.
    attempts = {name: st["attempts"] for name, st in run["stages"].items() if st["attempts"] > 1}
    if attempts:
        raise Failed(f"stages attempted more than once: {attempts}", ["orchestrator"])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = copy_run(stack, RUN_ID, Path(tmp))
        report = run_dir / "report" / "report.md"
        if not report.is_file() or not report.read_text().strip():
            raise Failed(f"no report at {report.relative_to(tmp)}", ["orchestrator"])
        for k in range(1, ITERATIONS + 1):
            ds = datasets.load_dataset(str(run_dir / "dataset"), split=f"train_iteration_{k}")
            columns = set(PREFERENCE_COLUMNS)
            if len(ds) == 0 or not columns <= set(ds.column_names):
                raise Failed(f"train_iteration_{k}: {len(ds)} rows, columns {ds.column_names}")
            row = ds[0]
            if row["chosen"][-1]["role"] != "assistant" or row["chosen"] == row["rejected"]:
                raise Failed(f"train_iteration_{k} row 0 is not a preference pair: {row}")
            log(f"dataset train_iteration_{k}: {len(ds)} pairs, columns {sorted(columns)}")
        log(
            f"report: {report.stat().st_size} bytes, {len(list(report.parent.glob('*.png')))} plots"
        )


def check_api(api: Api) -> None:
    listed = api.client.get("/runs").raise_for_status().json()
    if RUN_ID not in [r["run_id"] for r in listed]:
        raise Failed(f"GET /runs does not list {RUN_ID}: {listed}", ["api"])
    body = {
        "messages": [{"role": "user", "content": "Say something kind."}],
        "best_of": 4,
        "max_tokens": 16,
        "temperature": 1.0,
        "seed": 1,
    }
    r = api.client.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise Failed(
            f"best-of-n chat: HTTP {r.status_code}: {r.text[:500]}", ["api", "generator", "ranker"]
        )
    reply = r.json()
    content = reply["choices"][0]["message"]["content"]
    if reply.get("best_of") != 4 or not isinstance(content, str):
        raise Failed(f"best-of-n chat answered {reply}", ["api"])
    log(f"best-of-4 chat: {content!r} (ranker scores {reply.get('ranker_scores')})")


def check_second_up(stack: Stack, api: Api, before: dict[str, Any]) -> None:
    """`down` (volumes kept) then `up`: the finished run is found complete, nothing is redone."""
    stack("down", timeout=300)
    stack("up", "-d", "--no-build", timeout=600)
    wait_healthy(stack, SERVING, HEALTHY_WITHIN)
    deadline = time.monotonic() + RESUME_WITHIN
    while True:
        orch = stack.ps().get("orchestrator", {})
        if orch.get("State") == "exited":
            break
        if time.monotonic() > deadline:
            raise Failed(
                f"the second up's orchestrator did not finish within {RESUME_WITHIN:.0f}s",
                ["orchestrator"],
            )
        time.sleep(2)
    # The orchestrator's own output, not docker/run-or-resume.sh's echo: `pairloop resume`
    # says the run it found is complete and changes nothing (orchestrator/cli.py).
    logs = "\n".join(
        line for line in stack.logs("orchestrator", 300).splitlines() if "resuming it" not in line
    )
    if orch.get("ExitCode") != 0 or f"run {RUN_ID} is complete" not in logs:
        raise Failed(
            f"second up: orchestrator exited {orch.get('ExitCode')} without reporting run "
            f"{RUN_ID} completed (expected a resume of the finished run)",
            ["orchestrator"],
        )
    after = api.run()
    assert after is not None
    changed = [name for name, st in before["stages"].items() if after["stages"][name] != st]
    if after["status"] != "completed" or changed:
        raise Failed(
            f"second up redid work: status {after['status']}, changed stages {changed}",
            ["orchestrator"],
        )
    runs = sorted(r["run_id"] for r in api.client.get("/runs").json())
    if runs != sorted([RUN_ID, REFERENCE_ID]):
        raise Failed(f"second up created another run: {runs}", ["orchestrator"])
    log("second up: the finished run was found complete, no stage redone")


def check_nothing_left(env: dict[str, str]) -> None:
    label = f"label=com.docker.compose.project={PROJECT}"
    left = {}
    for kind in ("container", "volume", "network"):
        args = ["docker", kind, "ls", "-q", "--filter", label] + (
            ["-a"] if kind == "container" else []
        )
        out = subprocess.run(
            args, capture_output=True, text=True, timeout=60, env=env
        ).stdout.split()
        if out:
            left[kind] = out
    if left:
        raise Failed(f"down -v left {left}")
    log("down -v: no container, volume or network of the project is left")


def check_token_errors(stack: Stack) -> None:
    env = {k: v for k, v in stack.env.items() if k != "PAIRLOOP_ADMIN_TOKEN_FILE"}
    proc = subprocess.run(
        [*stack.base, "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )
    if proc.returncode == 0 or "PAIRLOOP_ADMIN_TOKEN_FILE" not in proc.stderr:
        raise Failed(
            f"compose config without PAIRLOOP_ADMIN_TOKEN_FILE did not name it: {proc.stderr}"
        )
    log(f"unset secret file: {proc.stderr.strip().splitlines()[-1]}")


def write_secrets(directory: Path) -> dict[str, str]:
    """Fresh secret files, as deploy/compose/env.example says to make them: the directory only
    ours (0700), the files readable (0444) by the containers' users. Returns the .env names."""
    directory.chmod(0o700)
    env = {}
    for name in SECRETS:
        path = directory / name
        path.write_text(secrets.token_urlsafe(24) + "\n")
        path.chmod(0o444)
        env[f"PAIRLOOP_{name.upper()}_FILE"] = str(path)
    return env


def image_sizes(env: dict[str, str]) -> dict[str, str]:
    """Image -> "size (unique, shared)" as Docker counts them: shared layers are stored once."""
    out = subprocess.run(
        ["docker", "system", "df", "-v", "--format", "{{json .Images}}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    ).stdout
    rows = {f"{r['Repository']}:{r['Tag']}": r for r in json.loads(out or "[]")}
    return {
        image: f"{rows[image]['Size']:>8} (unique {rows[image]['UniqueSize']}, "
        f"shared with other images {rows[image]['SharedSize']})"
        for image in IMAGES
        if image in rows
    }


def explain(stack: Stack, exc: Failed) -> None:
    """What failed: the containers' states, then the named services' last log lines."""
    print(f"\n[compose-test] FAILED: {exc}", flush=True)
    try:
        print(stack("ps", "-a", timeout=60, check=False).stdout)
        for name in exc.services or [*SERVING, "orchestrator", "models-init"]:
            print(f"----- last log lines of {name} -----")
            print(stack.logs(name, 60))
    except Exception as err:  # diagnostics must not hide the failure
        print(f"(could not collect logs: {err})")


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so that `finally` takes the stack down


def main() -> int:
    signal.signal(signal.SIGTERM, _terminated)
    t0 = time.monotonic()
    timings: Timings = Timings()
    daemon = Daemon()
    stack: Stack | None = None
    watch: ProgressWatch | None = None
    secrets_dir: Path | None = None
    try:
        env = compose_env.ensure_docker(daemon)
        compose_env.ensure_compose(env)
        timings["setup: docker + compose"] = time.monotonic() - t0
        t = time.monotonic()
        base = compose_env.ensure_base_image(env)
        if base:
            env["PYTHON_IMAGE"] = base
        timings["setup: base image"] = time.monotonic() - t
        t = time.monotonic()
        if in_ci() or env.get("PIP_NO_INDEX") == "1":
            compose_env.ensure_wheelhouse()
            env["PIP_NO_INDEX"] = "1"
        timings["setup: wheelhouse"] = time.monotonic() - t
        t = time.monotonic()
        if in_ci():
            assert base is not None
            env["PAIRLOOP_REDIS_IMAGE"] = compose_env.ensure_redis_image(base, env)
        timings["setup: redis image"] = time.monotonic() - t
        port = free_port()
        secrets_dir = Path(tempfile.mkdtemp(prefix="pairloop-compose-secrets-"))
        env |= write_secrets(secrets_dir)
        env["PAIRLOOP_API_PORT"] = str(port)
        api_token = (secrets_dir / "api_token").read_text().strip()
        stack = Stack(env)
        watch = ProgressWatch(stack)
        check_token_errors(stack)
        stack("down", "-v", "--remove-orphans", timeout=300)  # what a previous failed run left

        t = time.monotonic()
        # api and models-init run the orchestrator's and the ranker's images: built once, here.
        stack.stream("build", "generator", "ranker", "trainer", "orchestrator", timeout=1800)
        timings["build"] = time.monotonic() - t
        sizes = image_sizes(env)

        t = time.monotonic()
        stack("up", "-d", "--no-build", timeout=600)
        wait_healthy(stack, SERVING, HEALTHY_WITHIN)
        timings["up (healthy)"] = time.monotonic() - t
        watch.start()  # before iteration 1 trains: the generation and ranking come first

        api = Api(port, api_token)
        t = time.monotonic()
        run = run_with_faults(stack, api, watch)
        watch.stop()
        timings["run (with faults)"] = time.monotonic() - t
        check_run_dir(stack, run)
        check_api(api)

        t = time.monotonic()
        run_reference(stack)
        compare_with_reference(stack)
        timings["undisturbed run + compare"] = time.monotonic() - t

        t = time.monotonic()
        check_second_up(stack, api, run)
        timings["down + second up"] = time.monotonic() - t

        t = time.monotonic()
        stack("down", "-v", "--remove-orphans", timeout=300)
        check_nothing_left(env)
        timings["down -v"] = time.monotonic() - t
        stack = None
    except Missing as exc:
        print(f"[compose-test] cannot run: {exc}", flush=True)
        return 2
    except (Failed, RuntimeError, subprocess.TimeoutExpired) as exc:
        failure = exc if isinstance(exc, Failed) else Failed(f"{type(exc).__name__}: {exc}")
        if stack is not None:
            explain(stack, failure)
        else:
            print(f"\n[compose-test] FAILED during setup: {failure}", flush=True)
            if daemon.proc is not None:
                print(daemon.tail())
        return 1
    finally:
        if watch is not None:
            watch.stop()
        if stack is not None and os.environ.get("PAIRLOOP_COMPOSE_TEST_KEEP") != "1":
            stack("down", "-v", "--remove-orphans", timeout=300, check=False)
        compose_env.clear_wheelhouse()
        daemon.stop()
        if secrets_dir is not None and os.environ.get("PAIRLOOP_COMPOSE_TEST_KEEP") != "1":
            shutil.rmtree(secrets_dir, ignore_errors=True)
    timings["total"] = time.monotonic() - t0
    print("\n[compose-test] passed")
    for phase, seconds in timings.items():
        print(f"  {phase:<26} {seconds:7.1f} s")
    for image, size in sizes.items():
        print(f"  {image:<30} {size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

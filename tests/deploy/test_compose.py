"""docker-compose.yml (GPU) and docker-compose.cpu.yml (CPU demo override), checked statically.

The files are validated against the Compose Specification's JSON schema (the copy check-jsonschema
ships, pinned in the lock), after interpolation and merging; then every fact the stack depends on
is checked against the code: settings names, entry points, ports, paths and run configs.
"""

from __future__ import annotations

import json
import re
import shlex
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest

from orchestrator.config import DEFAULT_JUDGE_MODEL, load_run_config
from pairloop_local.tiny_models import ALL_BUILT_MARKER
from services.ranker.settings import RankerSettings

from .helpers import (
    REPO,
    TEST_SECRETS,
    InterpolationError,
    check_pairloop_argv,
    check_settings_env,
    compose_env,
    compose_model,
    image_extra,
    parse_dockerfile,
    run_pairloop_with_only,
    service_env,
    service_env_with_secrets,
    service_secrets,
    unreachable_demo_config,
)

GPU = ("docker-compose.yml",)
CPU = ("docker-compose.yml", "docker-compose.cpu.yml")
# Not "gpu"/"cpu": a test id "gpu" would read as the gpu marker (tests/conftest.py).
VARIANTS = {"gpu-stack": GPU, "cpu-stack": CPU}
STORE = "/models"


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    path = metadata.distribution("check-jsonschema").locate_file(
        "check_jsonschema/builtin_schemas/vendor/compose-spec.json"
    )
    schema = json.loads(Path(str(path)).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _errors(validator: jsonschema.protocols.Validator, model: dict) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(model)
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_valid_against_the_compose_specification(validator, variant: str) -> None:
    assert _errors(validator, compose_model(*VARIANTS[variant])) == []


def test_the_schema_rejects_what_compose_rejects(validator) -> None:
    model = compose_model(*GPU)
    model["services"]["generator"]["helthcheck"] = model["services"]["generator"].pop("healthcheck")
    model["services"]["orchestrator"]["depends_on"]["generator"]["condition"] = "service_up"
    errors = _errors(validator, model)
    assert any("helthcheck" in e for e in errors), errors
    assert any("depends_on" in e for e in errors), errors


SECRET_VARS = {
    "admin_token": "PAIRLOOP_ADMIN_TOKEN_FILE",
    "api_token": "PAIRLOOP_API_TOKEN_FILE",
    "redis_password": "PAIRLOOP_REDIS_PASSWORD_FILE",
}


def test_tokens_and_the_redis_password_are_secret_files_never_environment() -> None:
    """Compose secrets (files under /run/secrets), named in .env; a missing name stops config."""
    for name in (*GPU, "docker-compose.cpu.yml"):
        text = (REPO / name).read_text()
        assert "test-admin-token" not in text
    model = compose_model(*GPU)
    assert {name: s["file"] for name, s in model["secrets"].items()} == {
        "admin_token": "./secrets/admin_token",
        "api_token": "./secrets/api_token",
        "redis_password": "./secrets/redis_password",
    }
    for var in SECRET_VARS.values():
        with pytest.raises(InterpolationError, match=var):
            compose_model(*GPU, env=compose_env(**{var: ""}))
    example = (REPO / "deploy" / "compose" / "env.example").read_text()
    for var in SECRET_VARS.values():
        assert f"\n{var}=./secrets/" in example, var
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert ".env" in ignored and "/secrets/" in ignored
    for variant in VARIANTS.values():
        services = compose_model(*variant)["services"]
        for name, svc in services.items():
            # No token or password in any environment: `docker inspect` would show it.
            leaked = [k for k in service_env(svc) if re.search("_TOKEN$|PASSWORD", k)]
            assert not leaked, (name, leaked)
        mounted = {name: service_secrets(svc) for name, svc in services.items()}
        # One admin token: the generator checks the one the orchestrator containers send.
        assert mounted["generator"] == {"PAIRLOOP_GENERATOR_ADMIN_TOKEN": "admin_token"}
        for name in ("orchestrator", "api"):
            assert mounted[name]["PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN"] == "admin_token"
        assert mounted["api"]["PAIRLOOP_ORCHESTRATOR_API_TOKEN"] == "api_token"
        # Every Redis client gets the password its settings put into PAIRLOOP_REDIS_URL.
        for name, svc in services.items():
            if "PAIRLOOP_REDIS_URL" in service_env(svc):
                assert mounted[name].get("PAIRLOOP_REDIS_PASSWORD") == "redis_password", name
        assert mounted["redis"] == {"redis_password": "redis_password"}
        assert not mounted["ranker"], "the ranker needs no secret"


def _redis_argv(redis: dict) -> list[str]:
    """The redis-server argv of the Redis service's `sh -c "exec redis-server ..."`."""
    command = redis["command"]
    assert command[:2] == ["sh", "-c"], command
    script = command[2]
    assert script.startswith("exec redis-server "), script
    return shlex.split(script[len("exec ") :])


def test_redis_requires_the_password_and_its_health_check_uses_it(tmp_path: Path) -> None:
    """The service's own command and health check, run here against a real redis-server with
    the secret file's path mapped into tmp_path: the check answers only with the password."""
    import socket
    import subprocess

    import redis as redis_py

    from pairloop_local.processes import free_port, wait_until

    svc = compose_model(*GPU)["services"]["redis"]
    argv = _redis_argv(svc)
    assert argv[argv.index("--requirepass") + 1] == "$(cat /run/secrets/redis_password)"
    assert svc["user"] == "redis" and svc["cap_drop"] == ["ALL"]
    secret = tmp_path / "redis_password"
    secret.write_text(TEST_SECRETS["redis_password"] + "\n")
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    script = (
        svc["command"][2]
        .replace("/run/secrets/redis_password", str(secret))
        .replace("--dir /data", f"--dir {data} --port {port} --bind 127.0.0.1")
    )
    check = svc["healthcheck"]["test"]
    assert check[0] == "CMD-SHELL"
    probe = (
        check[1]
        .replace("/run/secrets/redis_password", str(secret))
        .replace("redis-cli ping", f"redis-cli -p {port} ping")
    )
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL, cwd=tmp_path)
    try:

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, timeout=20, interval=0.05, what="redis-server")
        assert subprocess.run(["sh", "-c", probe], timeout=20).returncode == 0
        with pytest.raises(redis_py.exceptions.AuthenticationError):
            redis_py.Redis(port=port).ping()
        # With a wrong password the health check fails (redis-cli itself exits 0 on NOAUTH).
        secret.write_text("wrong-password\n")
        assert subprocess.run(["sh", "-c", probe], timeout=20).returncode != 0
        ok = redis_py.Redis(port=port, password=TEST_SECRETS["redis_password"]).ping()
        assert ok is True
        # Redis rewrites its command line: the password is not in `ps`.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert TEST_SECRETS["redis_password"] not in cmdline, cmdline
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# Memory limits (bytes) each service must get at least: what it needs to work (see the comments
# in docker-compose.yml). The GPU trainer's is deliberately generous: a 7B DPO job's host peak.
MIN_MEMORY = {
    "gpu-stack": {"generator": 32 << 30, "ranker": 8 << 30, "trainer": 150 << 30},
    "cpu-stack": {"generator": 4 << 30, "ranker": 2 << 30, "trainer": 3 << 30},
}


def _bytes(limit: str) -> int:
    m = re.fullmatch(r"(\d+)([kmg]?)b?", str(limit).lower())
    assert m, limit
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_is_hardened_bounded_and_restarted(variant: str) -> None:
    """No capabilities, no privilege gain, an init as PID 1 (signals, zombies; it is also what
    lets a process in the container die of SIGKILL and the restart policy bring it back), a
    memory limit; long-running services restart when they die."""
    services = compose_model(*VARIANTS[variant])["services"]
    for name, svc in services.items():
        assert svc.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert svc.get("init") is True, name
        assert _bytes(svc["mem_limit"]) >= MIN_MEMORY[variant].get(name, 1 << 30), name
        # /dev/shm is memory of the container: the limit must leave room beyond it.
        if "shm_size" in svc:
            assert _bytes(svc["mem_limit"]) > _bytes(svc["shm_size"]), name
        if name in ("orchestrator", "models-init"):
            assert svc["restart"] == "no", name  # one-shot: a run resumes on the next `up`
        else:
            assert svc["restart"] in ("unless-stopped", "always"), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_build_contexts_and_dockerfiles_exist(variant: str) -> None:
    services = compose_model(*VARIANTS[variant])["services"]
    built = 0
    for name, svc in services.items():
        if "build" not in svc:
            assert svc["image"].startswith("redis:"), f"{name}: only redis is pulled, not built"
            continue
        context = REPO / svc["build"]["context"]
        dockerfile = context / svc["build"]["dockerfile"]
        assert context.is_dir() and dockerfile.is_file(), f"{name}: {dockerfile}"
        declared = {
            **parse_dockerfile(dockerfile).global_args,
            **{
                i.args.partition("=")[0]: ""
                for s in parse_dockerfile(dockerfile).stages
                for i in s.all("ARG")
            },
        }
        for arg in svc["build"].get("args", {}):
            assert arg in declared, f"{name}: build arg {arg} is not declared in {dockerfile.name}"
        built += 1
    assert built >= 5


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pairloop_variable_is_a_real_setting_and_parses(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each service's PAIRLOOP_* environment builds its settings class (the real validators)."""
    services = compose_model(*VARIANTS[variant])["services"]
    store = tmp_path / "models"
    for base in ("models/Mistral-7B-Instruct-v0.2", "models/tiny-llama", "runs"):
        (store / base).mkdir(parents=True)
    for name, svc in services.items():
        env = service_env_with_secrets(svc)
        settings = check_settings_env(env, store=store, monkeypatch=monkeypatch)
        if name in ("generator", "ranker", "trainer", "orchestrator", "api"):
            assert settings, f"{name} sets no PAIRLOOP_* variable"


@pytest.mark.parametrize("variant", VARIANTS)
def test_what_each_service_needs_is_set(variant: str) -> None:
    services = compose_model(*VARIANTS[variant])["services"]
    env = {name: service_env_with_secrets(svc) for name, svc in services.items()}
    required = {
        # Without these the generator binds loopback only, or cannot swap weights.
        "generator": {
            "PAIRLOOP_GENERATOR_MODEL",
            "PAIRLOOP_GENERATOR_HOST",
            "PAIRLOOP_GENERATOR_PORT",
            "PAIRLOOP_GENERATOR_MODEL_ROOT",
            "PAIRLOOP_GENERATOR_ADMIN_TOKEN",
        },
        "ranker": {"PAIRLOOP_RANKER_HOST", "PAIRLOOP_RANKER_PORT"},
        "trainer": {"PAIRLOOP_REDIS_URL", "PAIRLOOP_TRAINER_MODEL_STORE_ROOT"},
        "orchestrator": {"PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN", "PAIRLOOP_REDIS_URL"},
        "api": {
            "PAIRLOOP_ORCHESTRATOR_HOST",
            "PAIRLOOP_ORCHESTRATOR_PORT",
            "PAIRLOOP_ORCHESTRATOR_GENERATOR_URL",
            "PAIRLOOP_ORCHESTRATOR_RANKER_URL",
            "PAIRLOOP_ORCHESTRATOR_RUNS_ROOT",
            "PAIRLOOP_ORCHESTRATOR_API_TOKEN",
            "PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN",
        },
    }
    for name, names in required.items():
        assert names <= env[name].keys(), f"{name} lacks {sorted(names - env[name].keys())}"
        assert env[name].get("HF_HUB_OFFLINE") in ("0", "1"), name


def _run_config(services: dict, name: str = "orchestrator"):
    """The run config the orchestrator's command names, read through its bind mount."""
    svc = services[name]
    if svc.get("entrypoint") == ["pairloop-run-or-resume"]:
        path = svc["command"][0]  # CONFIG RUN_ID (docker/run-or-resume.sh)
    else:
        argv = svc["command"]
        assert argv[0] == "run", argv
        path = argv[1]
    for mount in svc["volumes"]:
        source, target, *_ = mount.split(":")
        if source.startswith(".") and path.startswith(target + "/"):
            return load_run_config(REPO / source / path[len(target) + 1 :])
    raise AssertionError(f"{path} is not on a bind mount of the orchestrator")


@pytest.mark.parametrize("variant", VARIANTS)
def test_ports_urls_and_paths_agree(variant: str) -> None:
    services = compose_model(*VARIANTS[variant])["services"]
    env = {name: service_env(svc) for name, svc in services.items()}
    cfg = _run_config(services)
    ports = {
        "generator": int(env["generator"]["PAIRLOOP_GENERATOR_PORT"]),
        "ranker": int(env["ranker"]["PAIRLOOP_RANKER_PORT"]),
        "redis": 6379,  # the image's default; its command sets no --port
        "api": int(env["api"]["PAIRLOOP_ORCHESTRATOR_PORT"]),
    }
    if "judge" in services:
        ports["judge"] = int(env["judge"]["PAIRLOOP_RANKER_PORT"])
    assert "--port" not in _redis_argv(services["redis"])

    def check_url(url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname in ports, f"{url}: {parts.hostname} is not a compose service"
        assert parts.port == ports[parts.hostname], (
            f"{url}: {parts.hostname} listens on {ports[parts.hostname]}"
        )

    judge = [cfg.evaluation.judge] if cfg.evaluation.judge else []
    for url in [*cfg.services.generator_urls, cfg.services.ranker_url, cfg.services.redis_url, *judge]:
        check_url(url)
    for var in (
        "PAIRLOOP_ORCHESTRATOR_GENERATOR_URL",
        "PAIRLOOP_ORCHESTRATOR_RANKER_URL",
        "PAIRLOOP_REDIS_URL",
    ):
        check_url(env["api"][var])
    for name in ("trainer", "orchestrator"):
        check_url(env[name]["PAIRLOOP_REDIS_URL"])
        assert env[name]["PAIRLOOP_REDIS_URL"] == cfg.services.redis_url

    # One model store, at one path everywhere: swaps and training jobs name paths inside it.
    for name in ("generator", "ranker", "judge", "trainer", "orchestrator", "api"):
        assert f"models:{STORE}" in services[name]["volumes"], name
    assert cfg.model_store == STORE
    assert env["generator"]["PAIRLOOP_GENERATOR_MODEL_ROOT"] == STORE
    assert env["trainer"]["PAIRLOOP_TRAINER_MODEL_STORE_ROOT"] == STORE
    assert env["generator"]["PAIRLOOP_GENERATOR_MODEL"] == cfg.base_model
    # create_run puts runs under MODEL_STORE/runs; the API lists that directory.
    assert env["api"]["PAIRLOOP_ORCHESTRATOR_RUNS_ROOT"] == f"{STORE}/runs"
    assert {"models", "redis-data"} <= set(compose_model(*VARIANTS[variant])["volumes"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_container_ports_match_the_images(variant: str) -> None:
    """The port a service listens on is the one its image's HEALTHCHECK and EXPOSE use."""
    services = compose_model(*VARIANTS[variant])["services"]
    for name, var in (
        ("generator", "PAIRLOOP_GENERATOR_PORT"),
        ("ranker", "PAIRLOOP_RANKER_PORT"),
        ("api", "PAIRLOOP_ORCHESTRATOR_PORT"),
    ):
        svc = services[name]
        df = parse_dockerfile(REPO / svc["build"]["context"] / svc["build"]["dockerfile"])
        port = service_env(svc)[var]
        args = svc["build"].get("args", {})
        expose = df.effective("EXPOSE", args)
        assert expose is not None and expose.args.split() == [port], name
        assert df.effective_env(args)[var] == port
        test = svc.get("healthcheck", {}).get("test")
        if test:
            assert f"127.0.0.1:{port}/" in " ".join(test), f"{name}: healthcheck port"


def test_only_the_api_is_published_and_only_on_loopback() -> None:
    for variant in VARIANTS.values():
        services = compose_model(*variant)["services"]
        published = {name: svc["ports"] for name, svc in services.items() if "ports" in svc}
        assert list(published) == ["api"]
        for port in published["api"]:
            assert port.startswith("127.0.0.1:"), port


@pytest.mark.parametrize("variant", VARIANTS)
def test_start_order_is_health_gated(variant: str) -> None:
    services = compose_model(*VARIANTS[variant])["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            target = services[dep]
            if cond["condition"] == "service_healthy":
                hc = target.get("healthcheck", {})
                has_image_check = (
                    "build" in target
                    and parse_dockerfile(
                        REPO / target["build"]["context"] / target["build"]["dockerfile"]
                    ).effective("HEALTHCHECK", target["build"].get("args"))
                    is not None
                )
                assert not hc.get("disable") and ("test" in hc or has_image_check), (
                    f"{name} waits for {dep} to be healthy, but {dep} has no health check"
                )
            else:
                assert cond["condition"] == "service_completed_successfully", (name, dep, cond)
                assert target.get("restart") == "no"
    orch = services["orchestrator"]["depends_on"]
    # The judge only where the orchestrator's run config names it (the GPU recipe; not the demo).
    judged = _run_config(services).evaluation.judge is not None
    assert {k for k, v in orch.items() if v["condition"] == "service_healthy"} == {
        "redis",
        "generator",
        "ranker",
        "trainer",
        *(["judge"] if judged else []),
    }
    assert judged == (variant == "gpu-stack")
    # The loop must not start before the engine is loaded: gate on /ready, which says so.
    for name in ("generator", "ranker", *(["judge"] if judged else [])):
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "/ready'" in test, name
        path = test.split("127.0.0.1:")[1].split("'")[0].split("/", 1)[1]
        from .helpers import app_routes

        assert ("GET", "/" + path) in app_routes("ranker" if name == "judge" else name)


def test_redis_persists_to_a_volume() -> None:
    redis = compose_model(*GPU)["services"]["redis"]
    argv = _redis_argv(redis)
    assert argv[0] == "redis-server"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    data_dir = argv[argv.index("--dir") + 1]
    assert f"redis-data:{data_dir}" in redis["volumes"]
    tag = redis["image"].split(":")[1]
    assert tag[0].isdigit() and tag.count(".") >= 2, f"redis image not pinned: {redis['image']}"


def test_gpus_are_reserved_on_gpu_and_released_on_cpu() -> None:
    gpu = compose_model(*GPU)["services"]
    cpu = compose_model(*CPU)["services"]
    for name in ("generator", "trainer"):
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices), name
        assert gpu[name]["build"]["args"]["VARIANT"] == "gpu"
    for name in ("generator", "ranker", "trainer"):
        assert "deploy" not in cpu[name], name
        assert cpu[name]["build"]["args"]["VARIANT"] == "cpu"
        assert cpu[name]["image"].endswith("-cpu:0.1.0")


def test_cpu_demo_runs_the_demo_recipe() -> None:
    """The compose demo config is `pairloop demo`'s, with container paths and addresses."""
    import yaml

    services = compose_model(*CPU)["services"]
    cfg = _run_config(services)
    demo = yaml.safe_load((REPO / "orchestrator" / "demo" / "demo.yaml").read_text())
    mine = yaml.safe_load((REPO / "configs" / "tiny-demo-compose.yaml").read_text())
    # Fewer iterations than the demo's 3 (CI runs this config), the rest the same.
    assert 1 <= mine.pop("iterations") <= demo.pop("iterations")
    for key in ("model_store", "base_model", "services"):
        mine.pop(key)
    mine["prompts"].pop("source")
    # The demo's own paths and its `local:` stack (what `pairloop demo` starts) are not compose's.
    for key in ("model_store", "base_model", "local", "services"):
        demo.pop(key)
    demo["prompts"].pop("source")
    assert mine == demo
    # The prompts are the ones the orchestrator image copies to that path.
    df = parse_dockerfile(REPO / "docker" / "orchestrator.Dockerfile")
    copies = [i.args.split() for i in df.final.all("COPY")]
    assert ["orchestrator/demo/prompts.jsonl", cfg.prompts.source] in copies
    # The base model is what models-init builds (pairloop tiny-models writes tiny-<arch>).
    init = services["models-init"]["entrypoint"]
    assert init[:2] == ["sh", "-c"]
    script = init[2]
    # "Built" is the marker build_tiny_models writes once every model is renamed into place.
    assert f"test -f {Path(cfg.base_model).parent / ALL_BUILT_MARKER}" in script
    argv = shlex.split(script.split("exec ", 1)[1])
    assert argv[:2] == ["pairloop", "tiny-models"] and Path(argv[2]) / "tiny-llama" == Path(
        cfg.base_model
    )
    check_pairloop_argv(argv)
    ranker = service_env(services["ranker"])
    from orchestrator.demo import DEMO_RANKER_ARGS

    assert [
        "--backend",
        ranker["PAIRLOOP_RANKER_BACKEND"],
        "--model",
        ranker["PAIRLOOP_RANKER_MODEL"],
    ] == DEMO_RANKER_ARGS


def test_commands_are_real_entry_points() -> None:
    """Every command a service runs exists: the image's entry point plus the compose command."""
    for variant in VARIANTS.values():
        services = compose_model(*variant)["services"]
        api = services["api"]
        df = parse_dockerfile(REPO / api["build"]["context"] / api["build"]["dockerfile"])
        entry = df.effective("ENTRYPOINT").exec_form()
        check_pairloop_argv([*entry, *api["command"]])
        # The orchestrator runs docker/run-or-resume.sh (copied into its image) with CONFIG RUN_ID.
        orch = services["orchestrator"]
        assert orch["entrypoint"] == ["pairloop-run-or-resume"]
        copies = [i.args.split() for i in df.final.all("COPY")]
        assert ["docker/run-or-resume.sh", "/usr/local/bin/pairloop-run-or-resume"] in copies
        _config, run_id = orch["command"]
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run_id), run_id
        assert _run_config(services).model_store == STORE
    script = (REPO / "docker" / "run-or-resume.sh").read_text()
    # PLAN_ARGS: flags of `pairloop run`, as the GPU stack sets them (`${PLAN_ARGS:-<default>}`).
    gpu_env = compose_model(*VARIANTS["gpu-stack"])["services"]["orchestrator"]["environment"]
    plan_args = shlex.split(gpu_env["PLAN_ARGS"])
    assert "--host-memory" in plan_args
    for line in script.splitlines():
        if line.strip().startswith("exec pairloop "):
            argv = [a.strip('"') for a in shlex.split(line.strip())[1:]]
            argv = [x for a in argv for x in (plan_args if a == "${PLAN_ARGS:-}" else [a])]
            check_pairloop_argv([a if not a.startswith("$") else "X" for a in argv])
    # The way the README resumes a run in the stack.
    check_pairloop_argv(["pairloop", "resume", "/models/runs/ID"])


def test_every_pairloop_container_is_non_root_and_read_only() -> None:
    """read_only root filesystems, a writable tmpfs where the images keep caches (/tmp)."""
    for variant in VARIANTS.values():
        services = compose_model(*variant)["services"]
        for name, svc in services.items():
            assert svc.get("read_only") is True, f"{name}: root filesystem is writable"
            if "build" not in svc:
                continue
            df = parse_dockerfile(REPO / svc["build"]["context"] / svc["build"]["dockerfile"])
            env = df.effective_env(svc["build"].get("args"))
            mounts = {t.split(":")[0]: t.partition(":")[2] for t in svc.get("tmpfs", [])}
            assert "/tmp" in mounts, f"{name}: tmpfs {mounts}"
            # exec: torch and vLLM load compiled extensions from their caches.
            assert "exec" in mounts["/tmp"].split(","), name
            for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR"):
                assert env[var].startswith("/tmp/"), (name, var)


def test_build_arguments_come_from_the_environment() -> None:
    """Base image and package source: unset = the Dockerfiles' defaults (public registries)."""
    model = compose_model(*CPU)
    for name, svc in model["services"].items():
        if "build" not in svc:
            continue
        args = svc["build"]["args"]
        for arg in ("PYTHON_IMAGE", "PIP_INDEX_URL", "PIP_NO_INDEX"):
            # No value: Compose passes the variable of its environment if set, else nothing.
            assert arg in args and args[arg] is None, (name, arg, args.get(arg))
    redis = compose_model(*CPU, env=compose_env(PAIRLOOP_REDIS_IMAGE="local/redis:7"))["services"]
    assert redis["redis"]["image"] == "local/redis:7"
    assert compose_model(*CPU)["services"]["redis"]["image"] == "redis:7.4.1-alpine"
    # The Debian-package Redis takes the same command and health check as the official image.
    df = parse_dockerfile(REPO / "docker" / "redis.Dockerfile")
    assert df.effective("HEALTHCHECK").exec_form() == ["redis-cli", "ping"]
    assert df.effective("USER").args == "redis"
    assert "--protected-mode" in _redis_argv(model["services"]["redis"])
    assert "redis-cli ping" in model["services"]["redis"]["healthcheck"]["test"][1]


def test_models_init_runs_with_only_what_its_image_installs(tmp_path: Path) -> None:
    """The tiny-model build runs here with imports limited to the image's packages (pyproject
    extra + the installed dependency closure); the orchestrator's image would lack torch."""
    svc = compose_model(*CPU)["services"]["models-init"]
    extra = image_extra(REPO / svc["build"]["context"] / svc["build"]["dockerfile"])
    argv = shlex.split(svc["entrypoint"][2].split("exec ", 1)[1])
    argv = [str(tmp_path) + a[len(STORE) :] if a.startswith(STORE + "/") else a for a in argv]
    proc = run_pairloop_with_only(extra, argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "models" / "tiny-llama" / "config.json").is_file()
    # The same command in the orchestrator's image fails: the check can tell the images apart.
    other = image_extra(REPO / "docker" / "orchestrator.Dockerfile")
    proc = run_pairloop_with_only(other, [*argv[:2], str(tmp_path / "other")], cwd=tmp_path)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr + proc.stdout


def test_orchestrator_image_runs_the_loop_up_to_the_services(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """`pairloop run` with only the orchestrator image's packages importable creates the run
    (config, prompts, manifest) and stops at the first service call; `pairloop report` works."""
    services = compose_model(*CPU)["services"]
    svc = services["orchestrator"]
    extra = image_extra(REPO / svc["build"]["context"] / svc["build"]["dockerfile"])
    store, _ = unreachable_demo_config(tmp_path, tiny_models["llama"])
    proc = run_pairloop_with_only(
        extra, ["pairloop", "run", "run.yaml", "--run-id", "r1"], cwd=tmp_path
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "No module named" not in out, out
    assert "generator at http://127.0.0.1:9" in out, out
    assert (store / "runs" / "r1" / "manifest.json").is_file()
    proc = run_pairloop_with_only(
        extra, ["pairloop", "report", str(store / "runs" / "r1")], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_time_shared_gpu_stack_gives_every_phase_all_8_gpus() -> None:
    """The recipe runs `placement: time_shared`: generation on all 8 GPUs (one data-parallel
    vLLM engine per GPU), training on the same 8 (the generator is released meanwhile)."""
    services = compose_model(*GPU)["services"]
    assert _run_config(services).placement == "time_shared"
    generator, trainer = service_env(services["generator"]), service_env(services["trainer"])
    eight = {str(i) for i in range(8)}
    assert set(generator["CUDA_VISIBLE_DEVICES"].split(",")) == eight
    assert set(trainer["CUDA_VISIBLE_DEVICES"].split(",")) == eight
    assert int(generator["PAIRLOOP_GENERATOR_DATA_PARALLEL_SIZE"]) == 8
    # The ranker keeps a replica resident on every GPU the generator uses: vLLM must leave it
    # room, and the ranking phase uses all 8.
    ranker = service_env(services["ranker"])
    assert set(ranker["CUDA_VISIBLE_DEVICES"].split(",")) == eight
    assert ranker["PAIRLOOP_RANKER_DEVICES"] == "cuda:all"
    assert "PAIRLOOP_RANKER_DEVICE" not in ranker
    settings = RankerSettings(devices=ranker["PAIRLOOP_RANKER_DEVICES"])
    assert settings.replica_devices(cuda_count=len(eight)) == [f"cuda:{i}" for i in range(8)]
    # `pairloop plan` of the recipe (ranker batch and judge resident): at most 0.76.
    assert float(generator["PAIRLOOP_GENERATOR_GPU_MEMORY_UTILIZATION"]) <= 0.76
    # The CPU demo runs one engine and one ranker replica.
    cpu_services = compose_model(*CPU)["services"]
    cpu = service_env(cpu_services["generator"])
    assert cpu["PAIRLOOP_GENERATOR_DATA_PARALLEL_SIZE"] == "1"
    assert service_env(cpu_services["ranker"])["PAIRLOOP_RANKER_DEVICES"] == "cpu"


def test_the_gpu_stack_judges_with_a_reward_model_beside_the_ranker() -> None:
    """The judge: the ranker's image and build serving a reward model that is not PairRM, on the
    ranker's GPU (time-shared: resident like it); the CPU demo names none and never starts it."""
    services = compose_model(*GPU)["services"]
    judge, ranker = services["judge"], services["ranker"]
    assert (judge["image"], judge["build"]) == (ranker["image"], ranker["build"])
    assert judge["deploy"] == ranker["deploy"]
    env, ranker_env = service_env(judge), service_env(ranker)
    assert env["PAIRLOOP_RANKER_BACKEND"] == "reward-model"
    assert env["PAIRLOOP_RANKER_MODEL"] == DEFAULT_JUDGE_MODEL != ranker_env["PAIRLOOP_RANKER_MODEL"]
    # On one of the ranker's GPUs (resident beside a replica): one judge replica is plenty.
    assert set(env["CUDA_VISIBLE_DEVICES"].split(",")) <= set(
        ranker_env["CUDA_VISIBLE_DEVICES"].split(",")
    )
    # The judge reads every evaluation answer whole: its candidate limit holds the longest one.
    recipe = _run_config(services).evaluation
    assert int(env["PAIRLOOP_RANKER_CANDIDATE_MAX_LENGTH"]) >= recipe.max_tokens
    assert int(env["PAIRLOOP_RANKER_SOURCE_MAX_LENGTH"]) >= 1024
    assert "8002/ready" in " ".join(judge["healthcheck"]["test"])
    cpu = compose_model(*CPU)["services"]
    assert cpu["judge"]["profiles"] == ["judge"] and "judge" not in cpu["orchestrator"]["depends_on"]
    assert _run_config(cpu).evaluation.judge is None


MULTI_NODE = ("docker-compose.yml", "docker-compose.multi-node.yml")
MULTI_NODE_ENV = {
    "PAIRLOOP_REDIS_HOST": "10.0.0.1",
    "PAIRLOOP_TRAINER_ADVERTISE_ADDRESS": "10.0.0.2",
    "PAIRLOOP_NFS_SERVER": "10.0.0.9",
    "PAIRLOOP_NFS_EXPORT": "/export/models",
}


def test_multi_node_override_gives_every_machine_a_trainer_on_the_shared_store(
    validator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = compose_model(*MULTI_NODE, env=compose_env(**MULTI_NODE_ENV))
    assert _errors(validator, model) == []
    trainer = model["services"]["trainer"]
    assert trainer["network_mode"] == "host"  # rendezvous and NCCL ports on the host
    env = service_env(trainer)
    assert urlsplit(env["PAIRLOOP_REDIS_URL"]).hostname == "10.0.0.1"
    assert env["PAIRLOOP_TRAINER_ADVERTISE_ADDRESS"] == "10.0.0.2"
    assert model["services"]["redis"]["ports"][0].endswith(":6379")
    (settings,) = check_settings_env(
        {k: v for k, v in env.items() if k.startswith("PAIRLOOP_TRAINER_")},
        store=tmp_path,
        monkeypatch=monkeypatch,
    )
    assert settings.advertise_address == "10.0.0.2" and settings.rendezvous_port == 29500
    opts = model["volumes"]["models"]["driver_opts"]
    assert opts["type"] == "nfs" and "addr=10.0.0.9" in opts["o"]
    assert opts["device"] == ":/export/models"
    # A machine without its own address (or the store's) is refused, not guessed.
    for var in MULTI_NODE_ENV:
        with pytest.raises(InterpolationError, match=var):
            compose_model(*MULTI_NODE, env=compose_env(**{**MULTI_NODE_ENV, var: ""}))

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

from orchestrator.config import load_run_config
from pairloop_local.tiny_models import ALL_BUILT_MARKER

from .helpers import (
    REPO,
    InterpolationError,
    check_pairloop_argv,
    check_settings_env,
    compose_env,
    compose_model,
    image_extra,
    parse_dockerfile,
    run_pairloop_with_only,
    service_env,
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


def test_tokens_come_from_the_environment_never_the_file() -> None:
    for name in (*GPU, "docker-compose.cpu.yml"):
        text = (REPO / name).read_text()
        assert "test-admin-token" not in text
    for missing in ("PAIRLOOP_ADMIN_TOKEN", "PAIRLOOP_API_TOKEN"):
        with pytest.raises(InterpolationError, match=missing):
            compose_model(*GPU, env=compose_env(**{missing: ""}))
    example = (REPO / "deploy" / "compose" / "env.example").read_text()
    assert "PAIRLOOP_ADMIN_TOKEN=\n" in example and "PAIRLOOP_API_TOKEN=\n" in example
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()
    model = compose_model(*GPU)
    token = compose_env()["PAIRLOOP_ADMIN_TOKEN"]
    gen = service_env(model["services"]["generator"])
    orch = service_env(model["services"]["orchestrator"])
    assert (
        gen["PAIRLOOP_GENERATOR_ADMIN_TOKEN"]
        == orch["PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN"]
        == token
    )


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
        settings = check_settings_env(service_env(svc), store=store, monkeypatch=monkeypatch)
        if name in ("generator", "ranker", "trainer", "orchestrator", "api"):
            assert settings, f"{name} sets no PAIRLOOP_* variable"


@pytest.mark.parametrize("variant", VARIANTS)
def test_what_each_service_needs_is_set(variant: str) -> None:
    services = compose_model(*VARIANTS[variant])["services"]
    env = {name: service_env(svc) for name, svc in services.items()}
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
    assert "--port" not in services["redis"]["command"]

    def check_url(url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname in ports, f"{url}: {parts.hostname} is not a compose service"
        assert parts.port == ports[parts.hostname], (
            f"{url}: {parts.hostname} listens on {ports[parts.hostname]}"
        )

    for url in [*cfg.services.generator_urls, cfg.services.ranker_url, cfg.services.redis_url]:
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
    for name in ("generator", "ranker", "trainer", "orchestrator", "api"):
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
    assert {k for k, v in orch.items() if v["condition"] == "service_healthy"} == {
        "redis",
        "generator",
        "ranker",
        "trainer",
    }
    # The loop must not start before the engine is loaded: gate on /ready, which says so.
    for name in ("generator", "ranker"):
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "/ready'" in test, name
        path = test.split("127.0.0.1:")[1].split("'")[0].split("/", 1)[1]
        from .helpers import app_routes

        assert ("GET", "/" + path) in app_routes(name)


def test_redis_persists_to_a_volume() -> None:
    redis = compose_model(*GPU)["services"]["redis"]
    argv = redis["command"]
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
    for line in script.splitlines():
        if line.strip().startswith("exec pairloop "):
            argv = [a.strip('"') for a in shlex.split(line.strip())[1:]]
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
    assert "--protected-mode" in model["services"]["redis"]["command"]
    assert model["services"]["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


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

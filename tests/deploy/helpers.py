"""Readers for the deployment files, with the semantics of the tools that consume them.

No Docker engine or cluster exists where the tests run, so each file is read the way its tool reads
it: Compose files through YAML (with Compose's `!reset`/`!override` tags), `${VAR}` interpolation
and Compose's merge rules for the constructs our override uses; kustomize through the real
kustomize built into kubectl; Dockerfiles through their instruction grammar (continuations,
comments, exec/shell forms, ARGs before FROM). Facts about the services come from the code itself:
`--help` of the real entry points, the settings classes, the FastAPI apps' routes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.32.0"  # the Kubernetes API schema the manifests are validated against
DOCKERFILES = {
    name: REPO / "docker" / f"{name}.Dockerfile"
    for name in ("generator", "ranker", "trainer", "orchestrator")
}

# --- Compose ---------------------------------------------------------------------------------


class Reset:
    """Compose's `!reset`: the key is removed from the merged model."""


class Override:
    """Compose's `!override`: the value replaces the base value instead of merging."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _ComposeLoader(yaml.SafeLoader):
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))  # type: ignore[arg-type]  # a scalar node


_ComposeLoader.add_constructor("!reset", _reset)
_ComposeLoader.add_constructor("!override", _override)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


class InterpolationError(ValueError):
    pass


_VAR = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, Override):
        return Override(interpolate(value.value, env))
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        present = name in env
        nonempty = present and env[name] != ""
        if op in (":-", "-"):
            use_default = not nonempty if op == ":-" else not present
            return arg if use_default else env[name]
        if op in (":?", "?"):
            missing = not nonempty if op == ":?" else not present
            if missing:
                raise InterpolationError(f"required variable {name} is missing: {arg}")
            return env[name]
        return env.get(name, "")

    return _VAR.sub(sub, value)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as Compose reads a .env file (comments and blank lines skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


# Keys whose sequences Compose replaces rather than appends when merging (a command is one argv).
_REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge of an override file into a base, for mappings and the sequences above.

    Other sequences (ports, volumes ...) merge by rules this helper does not model, so it refuses
    them: a test then fails instead of checking a model Compose would not build.
    """
    if isinstance(override, Reset):
        return Reset()
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            merged = merge(base[k], v, k) if k in base else _plain(v)
            if isinstance(merged, Reset):
                out.pop(k, None)
            else:
                out[k] = merged
        return out
    if isinstance(override, list) and key not in _REPLACED_SEQUENCES:
        raise NotImplementedError(f"merging sequence {key!r} is not modelled; use !override")
    return _plain(override)


def _plain(v: Any) -> Any:
    if isinstance(v, Override):
        return v.value
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items() if not isinstance(x, Reset)}
    return v


def compose_env(**overrides: str) -> dict[str, str]:
    """deploy/compose/env.example as a user's .env is: it names the secret files."""
    env = read_env_file(REPO / "deploy" / "compose" / "env.example")
    env.update(overrides)
    return env


# What the secret files hold in the tests (each secret's source name -> its content).
TEST_SECRETS = {
    "admin_token": "test-admin-token-0123",
    "api_token": "test-api-token-0123",
    "redis_password": "test-redis-password-0123",
}


def service_secrets(service: dict[str, Any]) -> dict[str, str]:
    """The file name under /run/secrets -> the top-level secret it is (Compose's short and
    long syntax: a bare name is mounted under its own name)."""
    out = {}
    for item in service.get("secrets", []):
        if isinstance(item, str):
            out[item] = item
        else:
            out[item.get("target", item["source"])] = item["source"]
    return out


def service_env_with_secrets(service: dict[str, Any]) -> dict[str, str]:
    """The variables a service's settings see: its environment plus its secret files (each
    read as the variable it is named after, pairloop/settings.py), with TEST_SECRETS' values."""
    env = service_env(service)
    for target, source in service_secrets(service).items():
        assert "/" not in target, f"secret {source} mounted outside /run/secrets: {target}"
        env[target] = TEST_SECRETS[source]
    return env


def compose_model(*files: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The interpolated, merged model of `files` (first is the base), as `docker compose config`."""
    env = compose_env() if env is None else env
    model: Any = None
    for name in files:
        doc = interpolate(load_compose(REPO / name), env)
        model = _plain(doc) if model is None else merge(model, doc)
    return model


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# --- Dockerfiles -----------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, else None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(--\S+\s+)*CMD\s+", "", text)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                if sep:
                    out[key] = value
        return out


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def resolve(self, text: str, args: dict[str, str] | None = None) -> str:
        values = {**self.global_args, **(args or {})}
        return re.sub(
            r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: values.get(m.group(1), m.group(0)), text
        )

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def chain(self, build_args: dict[str, str] | None = None) -> list[Stage]:
        """The final stage and the stages it is built FROM, final first (for a build's args)."""
        out, stage = [], self.final
        names = {s.name for s in self.stages}
        while True:
            out.append(stage)
            base = self.resolve(stage.base, build_args)
            if base not in names:
                return out
            stage = self.stage(base)

    def effective(
        self, keyword: str, build_args: dict[str, str] | None = None
    ) -> Instruction | None:
        """The last `keyword` instruction along the final stage's chain (as the image has it)."""
        for stage in self.chain(build_args):
            found = stage.all(keyword)
            if found:
                return found[-1]
        return None

    def effective_env(self, build_args: dict[str, str] | None = None) -> dict[str, str]:
        env: dict[str, str] = {}
        for stage in reversed(self.chain(build_args)):
            env.update(stage.env())
        return env


def parse_dockerfile(path: Path) -> Dockerfile:
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue  # comments, also inside continued instructions, are dropped by the parser
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            m = re.match(r"^(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", args, re.IGNORECASE)
            assert m, f"{path.name}: cannot parse FROM {args!r}"
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif not stages and keyword == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args))
    return Dockerfile(global_args, stages)


# --- Kubernetes ------------------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise AssertionError(
            "kubectl (with its built-in kustomize) is needed to render k8s/; install kubectl "
            ">= 1.27 (Debian/Ubuntu: the kubectl package) and run the tests again"
        )
    return path


@cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize k8s/<kustomization>`: kustomize's own rendering, as `apply -k` does."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(REPO / "k8s" / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"kustomize failed on k8s/{kustomization}:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def find(
    docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None
) -> list[dict[str, Any]]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return doc["spec"]["template"]["spec"]
    return None


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# --- facts from the code ---------------------------------------------------------------------


@cache
def help_text(*argv: str) -> str:
    """`argv --help` of a real entry point, run here (the same module the image runs)."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}  # one usage line per command
    proc = subprocess.run(
        [*argv, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env
    )
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def console_scripts() -> dict[str, str]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def python_argv(argv: list[str]) -> list[str]:
    """An image's `python3 -m X` / console-script argv as one this machine can run."""
    if argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    if argv[0] in console_scripts():
        module, _, func = console_scripts()[argv[0]].partition(":")
        code = f"import sys; from {module} import {func}; sys.exit({func}())"
        return [sys.executable, "-c", code, *argv[1:]]
    if argv[0] == "celery":
        return [sys.executable, "-m", "celery", *argv[1:]]
    raise AssertionError(f"{argv[0]!r} is not a pairloop entry point")


def settings_classes() -> dict[str, Any]:
    """Env prefix -> the settings class that reads it."""
    from orchestrator.settings import OrchestratorSettings
    from pairloop.settings import RedisSettings
    from services.generator.settings import GeneratorSettings
    from services.ranker.settings import RankerSettings
    from services.trainer.settings import TrainerSettings

    classes = (GeneratorSettings, RankerSettings, TrainerSettings, OrchestratorSettings)
    out = {cls.model_config["env_prefix"]: cls for cls in classes}
    out["PAIRLOOP_"] = RedisSettings
    return out


def env_names(cls: Any) -> set[str]:
    prefix = cls.model_config["env_prefix"]
    return {f"{prefix}{name}".upper() for name in cls.model_fields}


def owner_of(var: str) -> Any:
    """The settings class that reads PAIRLOOP_* variable `var` (longest prefix wins)."""
    for prefix, cls in sorted(settings_classes().items(), key=lambda kv: -len(kv[0])):
        if var.startswith(prefix) and (prefix != "PAIRLOOP_" or var in env_names(cls)):
            return cls
    return None


@cache
def app_routes(part: str) -> frozenset[tuple[str, str]]:
    """(method, path) of every route the part's FastAPI app serves (no engine is started)."""
    if part == "generator":
        from services.generator.app import create_app
        from services.generator.settings import GeneratorSettings

        app = create_app(GeneratorSettings())
    elif part == "ranker":
        from services.ranker.app import create_app as create_ranker
        from services.ranker.settings import RankerSettings

        app = create_ranker(RankerSettings())
    elif part == "orchestrator":
        from orchestrator.api.app import create_app as create_api
        from orchestrator.settings import OrchestratorSettings

        app = create_api(OrchestratorSettings())
    else:
        raise KeyError(part)
    return frozenset(
        (method, route.path)
        for route in app.routes
        for method in (getattr(route, "methods", None) or ())
    )


def check_settings_env(env: dict[str, str], *, store: Path, monkeypatch: Any) -> list[Any]:
    """Build every settings class a container's PAIRLOOP_* variables address, from those variables.

    Unknown PAIRLOOP_* names fail (the classes ignore extras, so a typo would pass silently);
    paths under /models are mapped into `store`, a stand-in for the shared volume.
    """
    owners = {}
    for var in env:
        if var.startswith("PAIRLOOP_"):
            cls = owner_of(var)
            assert cls is not None and var in env_names(cls), (
                f"{var} is read by no settings class (check the name against the class's fields)"
            )
            owners[cls.__name__] = cls
    for var in list(os.environ):
        if var.startswith("PAIRLOOP_"):
            monkeypatch.delenv(var)
    for var, value in env.items():
        if value.startswith("/models"):
            value = str(store) + value[len("/models") :]
        monkeypatch.setenv(var, value)
    return [cls() for cls in owners.values()]


def check_pairloop_argv(argv: list[str]) -> None:
    """`pairloop SUB [ARGS] [--OPTS]` is a real subcommand with these positionals and options."""
    assert argv[0] == "pairloop", argv
    sub = argv[1]
    text = help_text(*python_argv(argv[:2]))
    usage = next((line for line in text.splitlines() if "Usage:" in line), "")
    assert f"Usage: pairloop {sub} " in usage, f"`pairloop {sub}` is not a subcommand:\n{text}"
    positionals = re.findall(r"\{(\w+)\}", usage)
    given, rest = [], argv[2:]
    while rest:
        token = rest.pop(0)
        if token.startswith("--"):
            assert f" {token.split('=')[0]} " in text, f"pairloop {sub} has no option {token}"
            if "=" not in token and rest:
                rest.pop(0)
        else:
            given.append(token)
    assert len(given) == len(positionals), f"pairloop {sub} takes {positionals}, got {given}"


# --- what an image installs ------------------------------------------------------------------

_SELF = {"pairloop", "services", "orchestrator"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extra_closure(extra: str) -> set[str]:
    """Distributions `pip install .[extra]` brings in: pyproject's requirements, then each
    installed distribution's own requirements (markers evaluated for the extras asked of it)."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo: list[tuple[str, str]] = [(r, "") for r in project["dependencies"]]
    todo += [(r, "") for r in project["optional-dependencies"][extra]]
    seen: set[str] = set()
    while todo:
        text, asked = todo.pop()
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": asked}):
            continue
        name = _canon(req.name)
        if name == "pairloop":
            for sub in req.extras:
                todo += [(r, "") for r in project["optional-dependencies"][sub]]
            continue
        extras = sorted(req.extras)
        key = f"{name}[{','.join(extras)}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. vllm for the GPU image): nothing more to follow
        for sub in requires:
            for e in ["", *extras]:
                todo.append((sub, e))
    return {k.split("[")[0] for k in seen}


def allowed_modules(distributions: set[str]) -> set[str]:
    provided = metadata.packages_distributions()
    mods = {m for m, dists in provided.items() if any(_canon(d) in distributions for d in dists)}
    return mods | set(sys.stdlib_module_names) | _SELF


_BLOCKER = """
import importlib.machinery, json, os, sys
ALLOWED = set(json.loads(os.environ["PAIRLOOP_TEST_ALLOWED_MODULES"]))
class OnlyTheImage:
    # sys.path's finder, blind to top-level packages the image does not install: importing one
    # raises ModuleNotFoundError and find_spec() says None, as in the image.
    @staticmethod
    def find_spec(name, path=None, target=None):
        top = name.partition(".")[0]
        if path is None and top not in ALLOWED and not top.startswith("_"):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
    @staticmethod
    def invalidate_caches():
        importlib.machinery.PathFinder.invalidate_caches()
    @staticmethod
    def find_distributions(*args, **kwargs):
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)
sys.meta_path[:] = [OnlyTheImage if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
from orchestrator.cli import main
sys.argv[0] = "pairloop"
sys.exit(main())
"""


def run_pairloop_with_only(
    extra: str, argv: list[str], *, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """`pairloop ARGV` with imports limited to what `pip install .[extra]` installs."""
    assert argv[0] == "pairloop"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PAIRLOOP_TEST_ALLOWED_MODULES": json.dumps(sorted(allowed_modules(extra_closure(extra)))),
    }
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER, *argv[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def image_extra(dockerfile: Path) -> str:
    """The pyproject extra the Dockerfile installs: its requirements/images/IMAGE.txt's extra
    (deploy/image_requirements.py writes each file as that extra's closure), or `.[X]`/`whl)[X]`."""
    if str(REPO / "deploy") not in sys.path:
        sys.path.insert(0, str(REPO / "deploy"))
    from image_requirements import IMAGES, SHARED

    df = parse_dockerfile(dockerfile)
    text = " ".join(i.args for s in df.stages for i in s.all("RUN"))
    files = [
        f for f in re.findall(r"/opt/pairloop/requirements/([a-z]+)\.txt", text) if f != SHARED
    ]
    if files:
        return IMAGES[files[-1]]
    found = re.findall(r"(?:\"?\.|\.whl\))\[([a-z-]+)\]", text)
    assert found, f"{dockerfile.name}: installs no pyproject extra"
    return found[-1]


def unreachable_demo_config(tmp_path: Path, tiny_model: Path) -> tuple[Path, Path]:
    """The compose demo's run config on a local store with the real tiny model, its services on
    port 9 (discard: nothing listens, the first call fails at once): `pairloop run` creates the
    run and stops there. Returns (store, config path)."""
    store = tmp_path / "store"
    cfg = yaml.safe_load((REPO / "configs" / "tiny-demo-compose.yaml").read_text())
    # The real tiny model: run creation measures prompts with its tokenizer and context.
    shutil.copytree(tiny_model, store / cfg["base_model"])
    cfg["model_store"] = str(store)
    cfg["prompts"]["source"] = str(REPO / "orchestrator" / "demo" / "prompts.jsonl")
    cfg["services"].update(
        generator_urls=["http://127.0.0.1:9"],
        ranker_url="http://127.0.0.1:9",
        redis_url="redis://127.0.0.1:9/0",
        retries=0,
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return store, config

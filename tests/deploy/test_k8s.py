"""k8s/: the kustomize base and overlays, rendered by kustomize (kubectl's) and validated against
the Kubernetes API schema of a pinned version (kubernetes-validate, strict: unknown fields fail);
then checked against the code: probe paths against the apps' routes, commands against the entry
points, environment names against the settings classes, ports and names across objects."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from orchestrator.config import DEFAULT_JUDGE_MODEL, RunConfig, load_run_config
from pairloop_local.tiny_models import ALL_BUILT_MARKER

from .helpers import (
    K8S_VERSION,
    REPO,
    app_routes,
    check_pairloop_argv,
    check_settings_env,
    compose_model,
    container_env,
    find,
    help_text,
    pod_spec,
    python_argv,
    render,
)

KUSTOMIZATIONS = (
    "base",
    "overlays/gpu",
    "overlays/gpu-split",
    "overlays/cpu-demo",
    "overlays/multi-node",
)
OVERLAYS = ("overlays/gpu", "overlays/gpu-split", "overlays/cpu-demo", "overlays/multi-node")
# The base and every overlay in k8s/overlays, listed or not: the security checks cover them all.
EVERY_KUSTOMIZATION = (
    "base",
    *(
        f"overlays/{d.name}"
        for d in sorted((REPO / "k8s" / "overlays").iterdir())
        if (d / "kustomization.yaml").is_file()
    ),
)
# Container name -> the app whose routes its HTTP probes must hit.
APPS = {"generator": "generator", "ranker": "ranker", "judge": "ranker", "api": "orchestrator"}
STORE = "/models"


def _ids(values: tuple[str, ...]) -> list[str]:
    return [v.replace("/", "-") for v in values]


def _containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    return [] if spec is None else [*spec.get("initContainers", []), *spec["containers"]]


def _trainer(docs: tuple[dict, ...]) -> dict:
    """The trainer workers: a Deployment, or a StatefulSet on several nodes (multi-node)."""
    (workload,) = [*find(docs, "Deployment", "trainer"), *find(docs, "StatefulSet", "trainer")]
    return workload


def _workloads(docs: tuple[dict, ...]) -> list[dict]:
    return [d for d in docs if pod_spec(d) is not None]


def _run_config(docs: tuple[dict, ...]) -> RunConfig:
    """The run config the Job mounts at /config/run.yaml (from the generated ConfigMap)."""
    job = find(docs, "Job", "pairloop-run")[0]
    spec = pod_spec(job)
    volume = next(v for v in spec["volumes"] if v["name"] == "run-config")
    cm = find(docs, "ConfigMap", volume["configMap"]["name"])
    assert cm, f"the Job mounts ConfigMap {volume['configMap']['name']}, which is not rendered"
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "run-config")
    assert mount["mountPath"] == "/config"
    # Through the orchestrator's own loader (validation, then paths made absolute), from a file
    # as the Job sees it.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(cm[0]["data"]["run.yaml"])
        return load_run_config(path)


@pytest.mark.parametrize("kustomization", EVERY_KUSTOMIZATION, ids=_ids(EVERY_KUSTOMIZATION))
def test_every_manifest_validates_against_the_kubernetes_api(kustomization: str) -> None:
    docs = render(kustomization)
    assert docs
    failures = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert failures == []


def test_the_validation_can_fail() -> None:
    deployment = dict(find(render("overlays/gpu"), "Deployment", "generator")[0])
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _effective(spec: dict, container: dict, key: str) -> object:
    """A security setting as Kubernetes applies it: the container's, else the pod's."""
    own = container.get("securityContext", {})
    return own[key] if key in own else spec.get("securityContext", {}).get(key)


@pytest.mark.parametrize("kustomization", EVERY_KUSTOMIZATION, ids=_ids(EVERY_KUSTOMIZATION))
def test_pods_are_hardened_and_bounded(kustomization: str) -> None:
    """Every pod and container of the base and every overlay: no service-account token, non-root,
    read-only root filesystem (an emptyDir where the image keeps caches), no privilege
    escalation, no capabilities, RuntimeDefault seccomp, CPU and memory limits."""
    from .helpers import DOCKERFILES, parse_dockerfile

    # Image -> the top directories of the caches it writes (all under /tmp today).
    cache_dirs = {
        f"pairloop/{name}": {
            "/" + v.split("/")[1]
            for k, v in parse_dockerfile(path).effective_env({"VARIANT": "cpu"}).items()
            if k in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR")
        }
        for name, path in DOCKERFILES.items()
    }
    workloads = _workloads(render(kustomization))
    assert {d["metadata"]["name"] for d in workloads} >= {
        "generator",
        "ranker",
        "trainer",
        "redis",
        "orchestrator-api",
        "pairloop-run",
    }
    for doc in workloads:
        spec = pod_spec(doc)
        name = doc["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in _containers(doc):
            where = (name, c["name"])
            assert _effective(spec, c, "runAsNonRoot") is True, where
            assert _effective(spec, c, "seccompProfile") == {"type": "RuntimeDefault"}, where
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in c["securityContext"]["capabilities"], where
            assert "privileged" not in c["securityContext"], where
            limits = c["resources"]["limits"]
            assert {"cpu", "memory"} <= limits.keys(), where
            assert not c["image"].endswith(":latest"), c["image"]
            # Where the image writes (its caches under /tmp), an emptyDir is mounted.
            image = c["image"].split(":")[0].removesuffix("-cpu")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            # (wait-for-services only polls two URLs: it writes nothing.)
            needed = cache_dirs.get(image, set()) if c["name"] != "wait-for-services" else set()
            for path in needed:
                assert path in mounts and "emptyDir" in volumes[mounts[path]], (where, path)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_probes_hit_routes_the_services_serve_on_their_ports(kustomization: str) -> None:
    seen = set()
    for doc in _workloads(render(kustomization)):
        for c in _containers(doc):
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            env = container_env(c)
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = c.get(kind)
                if probe is None or "httpGet" not in probe:
                    continue
                app = APPS[c["name"]]
                path = probe["httpGet"]["path"]
                assert ("GET", path) in app_routes(app), f"{c['name']} {kind}: no GET {path}"
                port = probe["httpGet"]["port"]
                port = ports[port] if isinstance(port, str) else port
                port_var = next(k for k in env if k.endswith("_PORT"))
                assert str(port) == env[port_var]["value"], f"{c['name']}: probe port vs {port_var}"
                seen.add((c["name"], kind, path))
    for name in ("generator", "ranker", "api"):
        assert (name, "livenessProbe", "/health") in seen
        assert (name, "readinessProbe", "/ready") in seen


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_commands_are_the_real_entry_points(kustomization: str) -> None:
    docs = render(kustomization)
    # $PLAN_ARGS: the `pairloop run` flags an overlay sets (pairloop-deploy's plan_args).
    deploy = [
        d for d in docs if d["kind"] == "ConfigMap" and "pairloop-deploy" in d["metadata"]["name"]
    ]
    plan_args = deploy[0].get("data", {}).get("plan_args", "").split() if deploy else []
    if kustomization.endswith("gpu"):  # the trainer's GPUs and host memory reach the plan
        assert {"--gpus", "--host-memory"} <= set(plan_args), plan_args
    for doc in _workloads(docs):
        for c in _containers(doc):
            argv = c["command"]
            if argv[:2] == ["python3", "-m"]:
                module = argv[2]
                assert module in ("services.generator", "services.ranker", "services.trainer"), argv
                usage = help_text(*python_argv(argv)).splitlines()[0]
                assert f"python -m {module}" in usage
            elif argv[0] == "pairloop":
                check_pairloop_argv(argv)
            elif argv[:2] == ["sh", "-c"]:
                script = argv[2]
                for m in re.finditer(r"exec ((?:pairloop|celery) [^\n;]+)", script):
                    words = [w.strip('"') for w in m.group(1).split()]
                    words = [x for w in words for x in (plan_args if w == "$PLAN_ARGS" else [w])]
                    if words[0] == "pairloop":
                        check_pairloop_argv(words)
                    else:
                        assert words[:5] == [
                            "celery",
                            "-A",
                            "services.trainer.celery_app",
                            "inspect",
                            "ping",
                        ]
                        text = help_text(*python_argv(words[:5]))
                        assert all(o in text for o in ("--destination", "--timeout"))
                assert "exec " in script
            elif argv[:2] == ["python3", "-c"]:
                assert c["name"] == "wait-for-services"
            elif argv[0] == "redis-server":
                assert argv[argv.index("--appendonly") + 1] == "yes"
            else:
                raise AssertionError(
                    f"{doc['metadata']['name']}/{c['name']}: unknown command {argv}"
                )
            for kind in ("livenessProbe", "readinessProbe"):
                probe_cmd = c.get(kind, {}).get("exec", {}).get("command")
                if probe_cmd and c["name"] == "redis":
                    assert probe_cmd[:2] == ["sh", "-c"] and "redis-cli ping" in probe_cmd[2]
                    continue
                if probe_cmd and probe_cmd[:2] == ["python3", "-m"]:
                    usage = help_text(*python_argv(probe_cmd)).splitlines()[0]
                    assert f"python -m {probe_cmd[2]}" in usage, (c["name"], kind, probe_cmd)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_the_trainer_liveness_probe_does_not_depend_on_the_broker(kustomization: str) -> None:
    """A Redis outage must not get a training worker restarted: the probe reads the worker's
    heartbeat file, never Redis (no `celery inspect`/`control`, no Redis URL, no shell)."""
    trainers = [
        c
        for doc in _workloads(render(kustomization))
        for c in _containers(doc)
        if c["command"][:3] == ["python3", "-m", "services.trainer"]
    ]
    assert trainers
    for c in trainers:
        probe = c["livenessProbe"]
        assert probe["exec"]["command"] == ["python3", "-m", "services.trainer.liveness"]
        words = " ".join(probe["exec"]["command"]).lower()
        assert not any(w in words for w in ("celery", "inspect", "ping", "redis", "sh -c"))
        # Failing only after minutes of a stale heartbeat (the worker touches it every 10 s).
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 60


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) in an env value: a variable defined earlier in the list, else as is."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), value)


@pytest.mark.parametrize("kustomization", OVERLAYS, ids=_ids(OVERLAYS))
def test_environment_names_and_values_build_the_settings(
    kustomization: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each container's PAIRLOOP_* variables, resolved from ConfigMaps and Secrets, build its
    settings class; every ConfigMap and Secret reference names something that exists."""
    docs = render(kustomization)
    cfg = _run_config(docs)
    store = tmp_path / "models"
    (store / Path(cfg.base_model).relative_to(STORE)).mkdir(parents=True)
    secrets = {
        "admin-token": "test-admin-token-0123",
        "api-token": "test-api-token-0123",
        "redis-password": "test-redis-password-0123",
    }
    for doc in _workloads(docs):
        for c in _containers(doc):
            env: dict[str, str] = {}
            for name, item in container_env(c).items():
                if "value" in item:
                    env[name] = _expand(item["value"], env)
                    continue
                source = item["valueFrom"]
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    cms = find(docs, "ConfigMap", ref["name"])
                    assert cms, f"{c['name']}: {ref}"
                    if ref["key"] not in cms[0]["data"]:
                        # Kubernetes leaves an optional key's variable unset; a required one fails.
                        assert ref.get("optional"), f"{c['name']}: {ref}"
                        continue
                    env[name] = cms[0]["data"][ref["key"]]
                elif "fieldRef" in source:
                    # The pod's own name: a StatefulSet's first pod stands in for any.
                    assert source["fieldRef"]["fieldPath"] == "metadata.name", source
                    env[name] = f"{doc['metadata']['name']}-0"
                elif "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    # Created by hand (docs/deploy.md); never rendered from the repository.
                    assert ref["name"] == "pairloop-tokens" and ref["key"] in secrets, ref
                    env[name] = secrets[ref["key"]]
            built = check_settings_env(env, store=store, monkeypatch=monkeypatch)
            # Every Redis client's URL, and the one its settings assemble, carry the password.
            if "PAIRLOOP_REDIS_URL" in env:
                assert urlsplit(env["PAIRLOOP_REDIS_URL"]).password == secrets["redis-password"]
                from pairloop.settings import redis_url_for

                assert (
                    urlsplit(redis_url_for(cfg.services.redis_url)).password
                    == (secrets["redis-password"])
                ), c["name"]
                trainer = [b for b in built if type(b).__name__ == "TrainerSettings"]
                for settings in trainer:
                    assert urlsplit(settings.redis_url).password == secrets["redis-password"]
    assert not find(docs, "Secret"), "tokens must not be committed as a Secret manifest"
    readme = (REPO / "docs" / "deploy.md").read_text()
    assert "create secret generic pairloop-tokens" in readme
    for key in secrets:
        assert f"--from-literal={key}=" in readme


@pytest.mark.parametrize("kustomization", OVERLAYS, ids=_ids(OVERLAYS))
def test_services_ports_and_run_config_agree(kustomization: str) -> None:
    docs = render(kustomization)
    cfg = _run_config(docs)
    services = {d["metadata"]["name"]: d for d in find(docs, "Service")}

    def pods_for(service: dict) -> list[dict]:
        sel = service["spec"]["selector"]
        return [
            d
            for d in _workloads(docs)
            if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]

    # Every Service selects a workload, and its targetPort is a port that workload declares.
    for name, svc in services.items():
        pods = pods_for(svc)
        assert pods, f"Service {name} selects no pods"
        for port in svc["spec"]["ports"]:
            declared = {
                p["name"]: p["containerPort"]
                for c in pod_spec(pods[0])["containers"]
                for p in c.get("ports", [])
            }
            assert port["targetPort"] in declared, (
                f"Service {name}: no container port {port['targetPort']}"
            )

    def port_of(host: str) -> int:
        assert host in services, f"{host} is not a Service in the namespace"
        (port,) = services[host]["spec"]["ports"]
        return port["port"]

    # generator_dns: a headless Service, so DNS lists every replica (orchestrator/discovery.py).
    host, _, port = cfg.services.generator_dns.rpartition(":")
    assert services[host]["spec"]["clusterIP"] == "None"
    assert int(port) == port_of(host)
    assert [d["metadata"]["name"] for d in pods_for(services[host])] == ["generator"]
    judge = [cfg.evaluation.judge] if cfg.evaluation.judge else []
    for url in (cfg.services.ranker_url, cfg.services.redis_url, *judge):
        parts = urlsplit(url)
        assert parts.port == port_of(parts.hostname), url
    # The run waits for every service its config names, the judge included.
    wait = pod_spec(find(docs, "Job", "pairloop-run")[0])["initContainers"][0]["command"][2]
    assert all(f"{url}/ready" in wait for url in judge), wait
    # The same addresses everywhere else they are written.
    api = find(docs, "Deployment", "orchestrator-api")[0]
    env = container_env(pod_spec(api)["containers"][0])
    for var in (
        "PAIRLOOP_ORCHESTRATOR_GENERATOR_URL",
        "PAIRLOOP_ORCHESTRATOR_RANKER_URL",
        "PAIRLOOP_REDIS_URL",
    ):
        parts = urlsplit(env[var]["value"])
        assert parts.port == port_of(parts.hostname), var
    run_redis = urlsplit(cfg.services.redis_url)
    for doc in _workloads(docs):
        for c in _containers(doc):
            redis = container_env(c).get("PAIRLOOP_REDIS_URL")
            if redis:
                # The same Redis as the run config's, with the password in front of it.
                parts = urlsplit(redis["value"])
                assert parts.password == "$(PAIRLOOP_REDIS_PASSWORD)", c["name"]
                assert (parts.hostname, parts.port, parts.path) == (
                    run_redis.hostname,
                    run_redis.port,
                    run_redis.path,
                ), c["name"]
    wait = pod_spec(find(docs, "Job", "pairloop-run")[0])["initContainers"][0]["command"][2]
    for url in re.findall(r"http://[^\"']+", wait):
        parts = urlsplit(url)
        # /v1/models: a time-shared generator answers it while released (/ready: 503).
        assert parts.port == port_of(parts.hostname) and parts.path in ("/ready", "/v1/models")


@pytest.mark.parametrize("kustomization", OVERLAYS, ids=_ids(OVERLAYS))
def test_one_model_store_at_one_path(kustomization: str) -> None:
    docs = render(kustomization)
    cfg = _run_config(docs)
    assert cfg.model_store == STORE
    for doc in _workloads(docs):
        if doc["metadata"]["name"] == "redis":
            continue
        spec = pod_spec(doc)
        claim = next(v for v in spec["volumes"] if v["name"] == "model-store")
        assert claim["persistentVolumeClaim"]["claimName"] == "model-store"
        for c in spec["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert mounts["model-store"] == STORE, (doc["metadata"]["name"], c["name"])
    gen = container_env(pod_spec(find(docs, "Deployment", "generator")[0])["containers"][0])
    assert gen["PAIRLOOP_GENERATOR_MODEL_ROOT"]["value"] == STORE
    deploy_cm = find(docs, "ConfigMap")
    data = next(cm["data"] for cm in deploy_cm if "base_model_path" in cm.get("data", {}))
    assert data["base_model_path"] == cfg.base_model
    assert data["run_id"] == cfg.run_id, "a retried Job pod would not find its run to resume"
    trainer = container_env(pod_spec(_trainer(docs))["containers"][0])
    assert trainer["PAIRLOOP_TRAINER_MODEL_STORE_ROOT"]["value"] == STORE
    api = container_env(pod_spec(find(docs, "Deployment", "orchestrator-api")[0])["containers"][0])
    assert api["PAIRLOOP_ORCHESTRATOR_RUNS_ROOT"]["value"] == f"{STORE}/runs"
    # The Job resumes exactly the directory `pairloop run` creates: MODEL_STORE/runs/RUN_ID.
    script = pod_spec(find(docs, "Job", "pairloop-run")[0])["containers"][0]["command"][2]
    assert f'"{STORE}/runs/$RUN_ID/manifest.json"' in script
    assert "exec pairloop run /config/run.yaml" in script


def _gpu_limits(docs: tuple[dict, ...]) -> dict[str, int]:
    """GPUs each workload holds: its containers' nvidia.com/gpu limits x its replicas."""
    held = {}
    for doc in _workloads(docs):
        per_pod = sum(
            int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            for c in _containers(doc)
        )
        held[doc["metadata"]["name"]] = per_pod * int(doc["spec"].get("replicas", 1))
    return held


def test_time_shared_gpu_overlay_fits_one_8_gpu_node() -> None:
    docs = render("overlays/gpu")
    held = _gpu_limits(docs)
    # The GPU limits of all pods sum to the node's 8 (the trainer pod holds them).
    assert sum(held.values()) <= 8 and held["trainer"] == 8, held
    gen = pod_spec(find(docs, "Deployment", "generator")[0])
    env = container_env(gen["containers"][0])
    # Generation uses every GPU: one data-parallel engine per GPU of the node.
    assert env["PAIRLOOP_GENERATOR_DATA_PARALLEL_SIZE"]["value"] == "8"
    # `pairloop plan` of the recipe (ranker batch and judge resident): at most 0.76.
    assert float(env["PAIRLOOP_GENERATOR_GPU_MEMORY_UTILIZATION"]["value"]) <= 0.76
    # Ranking uses every GPU too: one PairRM replica per GPU the ranker sees (all 8).
    ranker = container_env(pod_spec(find(docs, "Deployment", "ranker")[0])["containers"][0])
    assert ranker["PAIRLOOP_RANKER_DEVICES"]["value"] == "cuda:all"
    for name in ("generator", "ranker", "judge"):
        spec = pod_spec(find(docs, "Deployment", name)[0])
        assert container_env(spec["containers"][0])["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
        (term,) = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "trainer"}
    # A released generator (/ready 503) stays listed: the run finds it and wakes it.
    (headless,) = find(docs, "Service", "generator-headless")
    assert headless["spec"]["publishNotReadyAddresses"] is True
    wait = pod_spec(find(docs, "Job", "pairloop-run")[0])["initContainers"][0]["command"][2]
    assert "http://generator-headless:8000/v1/models" in wait
    assert ("GET", "/v1/models") in app_routes("generator")
    (pvc,) = [
        p for p in find(docs, "PersistentVolumeClaim") if p["metadata"]["name"] == "model-store"
    ]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cfg = _run_config(docs)
    assert cfg.placement == "time_shared"
    recipe = load_run_config(REPO / "configs" / "snorkel-mistral-pairrm.yaml")
    exclude = {"services", "local", "run_id"}
    assert cfg.model_dump(exclude=exclude) == recipe.model_dump(exclude=exclude), (
        "k8s/overlays/gpu/run-config.yaml drifted from configs/snorkel-mistral-pairrm.yaml"
    )


def test_gpu_split_overlay_fits_a_generation_node_and_a_training_node() -> None:
    docs = render("overlays/gpu-split")
    held = _gpu_limits(docs)
    pools: dict[str, int] = {}
    for doc in _workloads(docs):
        if held[doc["metadata"]["name"]]:
            pool = pod_spec(doc)["nodeSelector"]["pairloop.dev/pool"]
            pools[pool] = pools.get(pool, 0) + held[doc["metadata"]["name"]]
    assert pools == {"generation": 8, "training": 8}, pools
    assert held["judge"] == 1  # a GPU is one container's here: the judge has its own
    gen = container_env(pod_spec(find(docs, "Deployment", "generator")[0])["containers"][0])
    assert int(gen["PAIRLOOP_GENERATOR_DATA_PARALLEL_SIZE"]["value"]) == held["generator"]
    # The generation node's GPUs not generating are the ranker's, a replica on each of them.
    ranker = container_env(pod_spec(find(docs, "Deployment", "ranker")[0])["containers"][0])
    assert ranker["PAIRLOOP_RANKER_DEVICES"]["value"] == "cuda:all"
    assert held["generator"] + held["ranker"] + held["judge"] == 8 and held["ranker"] > 1, held
    cfg = _run_config(docs)
    assert cfg.placement == "dedicated"
    recipe = load_run_config(REPO / "configs" / "snorkel-mistral-pairrm.yaml")
    exclude = {"services", "local", "run_id", "placement"}
    assert cfg.model_dump(exclude=exclude) == recipe.model_dump(exclude=exclude)


def test_multi_node_overlay_runs_one_trainer_per_node_as_one_world() -> None:
    docs = render("overlays/multi-node")
    assert not find(docs, "Deployment", "trainer"), "the single-node trainer must give way"
    (sts,) = find(docs, "StatefulSet", "trainer")
    (svc,) = find(docs, "Service", "trainer")
    cfg = _run_config(docs)
    # One pod per machine of the job's world, each on its own node with 8 GPUs.
    machines = cfg.dpo.num_machines
    assert machines > 1 and sts["spec"]["replicas"] == machines
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    spec = pod_spec(sts)
    (term,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    trainer = spec["containers"][0]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 8
    # Stable names: the headless Service governs the set, and each pod advertises its own.
    assert sts["spec"]["serviceName"] == "trainer" and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    env = container_env(trainer)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["PAIRLOOP_TRAINER_ADVERTISE_ADDRESS"]["value"] == "$(POD_NAME).trainer"
    port = int(env["PAIRLOOP_TRAINER_RENDEZVOUS_PORT"]["value"])
    assert port in [p["port"] for p in svc["spec"]["ports"]]
    assert port in [p["containerPort"] for p in trainer["ports"]]
    assert env["NCCL_SOCKET_IFNAME"]["value"] and env["GLOO_SOCKET_IFNAME"]["value"]
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"
    assert env["PAIRLOOP_TRAINER_STRATEGY"]["value"] == "fsdp"
    # Peers reach each other (rendezvous, NCCL's ephemeral ports) despite the default deny.
    (peers,) = find(docs, "NetworkPolicy", "trainer-peers")
    (rule,) = peers["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "trainer"}}}]
    assert "ports" not in rule
    # The sharded checkpoints go to the one shared volume every machine mounts read-write.
    (pvc,) = find(docs, "PersistentVolumeClaim", "model-store")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = {v["name"]: v for v in spec["volumes"]}
    assert mounts["model-store"]["persistentVolumeClaim"]["claimName"] == "model-store"
    # Generation time-shared on machine 0's node, as the single-node overlay does it.
    assert cfg.placement == "time_shared"
    for name in ("generator", "ranker"):
        pod = pod_spec(find(docs, "Deployment", name)[0])
        (near,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert near["labelSelector"]["matchLabels"] == {
            "statefulset.kubernetes.io/pod-name": "trainer-0"
        }
    # The global batch still splits over every machine's GPUs.
    world = machines * 8
    assert cfg.dpo.gradient_accumulation_for(world) >= 1


def test_cpu_demo_overlay_needs_no_gpu_and_runs_the_demo_recipe() -> None:
    docs = render("overlays/cpu-demo")
    for doc in _workloads(docs):
        for c in _containers(doc):
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), c["name"]
    cfg = _run_config(docs)
    compose_cfg = load_run_config(REPO / "configs" / "tiny-demo-compose.yaml")
    exclude = {"services", "run_id"}
    assert cfg.model_dump(exclude=exclude) == compose_cfg.model_dump(exclude=exclude)
    gen = pod_spec(find(docs, "Deployment", "generator")[0])
    (init,) = gen["initContainers"]
    # "Built" is the marker build_tiny_models writes once every model is renamed into place.
    assert f"test -f {Path(cfg.base_model).parent / ALL_BUILT_MARKER}" in init["command"][2]
    # The image test_compose proves can run that command.
    compose_init = compose_model("docker-compose.yml", "docker-compose.cpu.yml")["services"][
        "models-init"
    ]
    assert init["image"] == compose_init["image"]
    assert init["command"] == compose_init["entrypoint"]
    ranker = container_env(pod_spec(find(docs, "Deployment", "ranker")[0])["containers"][0])
    from orchestrator.demo import DEMO_RANKER_ARGS

    assert [
        "--backend",
        ranker["PAIRLOOP_RANKER_BACKEND"]["value"],
        "--model",
        ranker["PAIRLOOP_RANKER_MODEL"]["value"],
    ] == DEMO_RANKER_ARGS


@pytest.mark.parametrize("kustomization", OVERLAYS, ids=_ids(OVERLAYS))
def test_images_are_the_ones_compose_builds(kustomization: str) -> None:
    files = (
        ("docker-compose.yml",)
        if kustomization.startswith(("overlays/gpu", "overlays/multi-node"))
        else ("docker-compose.yml", "docker-compose.cpu.yml")
    )
    built = {svc["image"] for svc in compose_model(*files)["services"].values() if "build" in svc}
    for doc in _workloads(render(kustomization)):
        for c in _containers(doc):
            if not c["image"].startswith("redis:"):
                assert c["image"] in built, f"{c['image']} is not an image compose builds"


@pytest.mark.parametrize("kustomization", OVERLAYS, ids=_ids(OVERLAYS))
def test_only_orchestrator_pods_reach_the_generator(kustomization: str) -> None:
    """NetworkPolicies filter ports, not paths: the whole generator port (admin route included)
    is open only to the pods that swap weights, and those are exactly the orchestrator's."""
    docs = render(kustomization)
    (policy,) = find(docs, "NetworkPolicy", "generator-ingress")
    gen = find(docs, "Deployment", "generator")[0]
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items()
        <= gen["spec"]["template"]["metadata"]["labels"].items()
    )
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    gen_port = pod_spec(gen)["containers"][0]["ports"][0]["containerPort"]
    assert [p["port"] for p in rule["ports"]] == [gen_port]
    assert ("POST", "/admin/weights") in app_routes("generator")
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, (
        "no namespaceSelector/ipBlock: nothing outside the namespace"
    )
    labels = peer["podSelector"]["matchLabels"]
    allowed = {
        d["metadata"]["name"]
        for d in _workloads(docs)
        if labels.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    }
    assert allowed == {"pairloop-run", "orchestrator-api"}
    # Those are the pods that hold the admin token.
    holders = {
        d["metadata"]["name"]
        for d in _workloads(docs)
        for c in _containers(d)
        if "PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN" in container_env(c)
    }
    assert holders == allowed


@pytest.mark.parametrize("kustomization", EVERY_KUSTOMIZATION, ids=_ids(EVERY_KUSTOMIZATION))
def test_redis_requires_the_password_from_the_secret(kustomization: str, tmp_path: Path) -> None:
    """Redis's argv and readiness probe, as the kubelet runs them ($(VAR) expanded, the probe in
    the container's environment), against a real redis-server here: PONG only with the password."""
    import os
    import socket
    import subprocess

    import redis as redis_py

    from pairloop_local.processes import free_port, wait_until

    (sts,) = find(render(kustomization), "StatefulSet", "redis")
    (c,) = pod_spec(sts)["containers"]
    env = container_env(c)
    ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "pairloop-tokens", "key": "redis-password"}
    argv = c["command"]
    assert argv[argv.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    password = "test-redis-password-0123"
    port = free_port()
    argv = [_expand(a, {"REDIS_PASSWORD": password}) for a in argv]
    argv[argv.index("--dir") + 1] = str(tmp_path)
    argv += ["--port", str(port), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, cwd=tmp_path)
    try:

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, timeout=20, interval=0.05, what="redis-server")
        probe = c["readinessProbe"]["exec"]["command"]
        probe = [*probe[:2], probe[2].replace("redis-cli ping", f"redis-cli -p {port} ping")]

        def run_probe(value: str) -> int:
            return subprocess.run(
                probe, env={**os.environ, "REDIS_PASSWORD": value}, timeout=20
            ).returncode

        assert run_probe(password) == 0
        assert run_probe("wrong-password") != 0  # redis-cli exits 0 on NOAUTH: grep decides
        with pytest.raises(redis_py.exceptions.AuthenticationError):
            redis_py.Redis(port=port).ping()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("kustomization", EVERY_KUSTOMIZATION, ids=_ids(EVERY_KUSTOMIZATION))
def test_network_policies_deny_by_default_and_guard_the_api(kustomization: str) -> None:
    """A default-deny ingress policy for the whole namespace; the orchestrator API (whose GET and
    chat routes take no token) is reachable on its port only from labelled api-client pods."""
    docs = render(kustomization)
    (deny,) = find(docs, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    (policy,) = find(docs, "NetworkPolicy", "orchestrator-api-ingress")
    (api,) = find(docs, "Deployment", "orchestrator-api")
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    port = pod_spec(api)["containers"][0]["ports"][0]["containerPort"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port}]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "nothing outside the namespace"
    allowed = peer["podSelector"]["matchLabels"]
    assert allowed == {"pairloop.io/api-client": "true"}
    # No workload of ours carries it: nothing in the stack needs the API.
    assert not [
        d["metadata"]["name"]
        for d in _workloads(docs)
        if allowed.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    # The routes that take no token are the reason for the policy: they exist.
    routes = app_routes("orchestrator")
    assert ("GET", "/runs") in routes and ("POST", "/v1/chat/completions") in routes
    # Every pod that serves a port is let in by exactly one policy besides the default deny.
    serving = {
        d["metadata"]["name"]
        for d in _workloads(docs)
        if any(c.get("ports") for c in pod_spec(d)["containers"])
    }
    covered = set()
    for pol in find(docs, "NetworkPolicy"):
        if pol["metadata"]["name"] == "default-deny-ingress":
            continue
        sel = pol["spec"]["podSelector"]["matchLabels"]
        covered |= {
            d["metadata"]["name"]
            for d in _workloads(docs)
            if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        }
    assert serving <= covered, serving - covered


@pytest.mark.parametrize("kustomization", OVERLAYS, ids=_ids(OVERLAYS))
def test_gpu_overlays_judge_with_a_reward_model_only_the_orchestrator_reaches(
    kustomization: str,
) -> None:
    """The GPU overlays run the judge their run config names: the ranker image serving a reward
    model that is not PairRM, on port 8002, reachable only from the orchestrator's pods. The CPU
    demo names no judge and runs none."""
    docs = render(kustomization)
    cfg = _run_config(docs)
    judges = find(docs, "Deployment", "judge")
    if kustomization.endswith("cpu-demo"):
        assert cfg.evaluation.judge is None and not judges
        return
    assert cfg.evaluation.judge == "http://judge:8002"
    (judge,) = judges
    (ranker,) = find(docs, "Deployment", "ranker")
    (container,) = pod_spec(judge)["containers"]
    assert container["image"] == pod_spec(ranker)["containers"][0]["image"]
    env = {k: v["value"] for k, v in container_env(container).items() if "value" in v}
    assert env["PAIRLOOP_RANKER_BACKEND"] == "reward-model"
    assert env["PAIRLOOP_RANKER_MODEL"] == DEFAULT_JUDGE_MODEL
    ranker_env = container_env(pod_spec(ranker)["containers"][0])
    assert ranker_env["PAIRLOOP_RANKER_MODEL"]["value"] != DEFAULT_JUDGE_MODEL
    # The judge reads every evaluation answer whole: its candidate limit holds the longest one.
    assert int(env["PAIRLOOP_RANKER_CANDIDATE_MAX_LENGTH"]) >= cfg.evaluation.max_tokens
    assert int(env["PAIRLOOP_RANKER_SOURCE_MAX_LENGTH"]) >= 1024
    assert env["PAIRLOOP_RANKER_PORT"] == "8002"
    (policy,) = find(docs, "NetworkPolicy", "judge-ingress")
    labels = judge["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8002}]
    (peer,) = rule["from"]
    allowed = {
        d["metadata"]["name"]
        for d in _workloads(docs)
        if peer["podSelector"]["matchLabels"].items()
        <= d["spec"]["template"]["metadata"]["labels"].items()
    }
    assert allowed == {"pairloop-run", "orchestrator-api"}

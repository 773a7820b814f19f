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

from orchestrator.config import RunConfig, load_run_config
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

KUSTOMIZATIONS = ("base", "overlays/gpu", "overlays/cpu-demo")
OVERLAYS = ("overlays/gpu", "overlays/cpu-demo")
# Container name -> the app whose routes its HTTP probes must hit.
APPS = {"generator": "generator", "ranker": "ranker", "api": "orchestrator"}
STORE = "/models"


def _ids(values: tuple[str, ...]) -> list[str]:
    return [v.replace("/", "-") for v in values]


def _containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    return [] if spec is None else [*spec.get("initContainers", []), *spec["containers"]]


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


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
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


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_pods_are_hardened_and_bounded(kustomization: str) -> None:
    for doc in _workloads(render(kustomization)):
        spec = pod_spec(doc)
        name = doc["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        for c in _containers(doc):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            limits = c["resources"]["limits"]
            assert {"cpu", "memory"} <= limits.keys(), (name, c["name"])
            assert not c["image"].endswith(":latest"), c["image"]


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
    for doc in _workloads(render(kustomization)):
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
                if probe_cmd and probe_cmd[:2] == ["sh", "-c"]:
                    words = probe_cmd[2].replace("exec ", "").split()
                    assert words[:5] == [
                        "celery",
                        "-A",
                        "services.trainer.celery_app",
                        "inspect",
                        "ping",
                    ]
                    assert words[6] == "trainer@$POD_NAME"
                    assert (
                        container_env(c)["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
                        == "metadata.name"
                    )


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
    secrets = {"admin-token": "test-admin-token-0123", "api-token": "test-api-token-0123"}
    for doc in _workloads(docs):
        for c in _containers(doc):
            env = {}
            for name, item in container_env(c).items():
                if "value" in item:
                    env[name] = item["value"]
                    continue
                source = item["valueFrom"]
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    cms = find(docs, "ConfigMap", ref["name"])
                    assert cms and ref["key"] in cms[0]["data"], f"{c['name']}: {ref}"
                    env[name] = cms[0]["data"][ref["key"]]
                elif "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    # Created by hand (docs/deploy.md); never rendered from the repository.
                    assert ref["name"] == "pairloop-tokens" and ref["key"] in secrets, ref
                    env[name] = secrets[ref["key"]]
            check_settings_env(env, store=store, monkeypatch=monkeypatch)
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
    for url in (cfg.services.ranker_url, cfg.services.redis_url):
        parts = urlsplit(url)
        assert parts.port == port_of(parts.hostname), url
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
    for doc in _workloads(docs):
        for c in _containers(doc):
            redis = container_env(c).get("PAIRLOOP_REDIS_URL")
            if redis:
                assert redis["value"] == cfg.services.redis_url, c["name"]
    wait = pod_spec(find(docs, "Job", "pairloop-run")[0])["initContainers"][0]["command"][2]
    for url in re.findall(r"http://[^\"']+", wait):
        parts = urlsplit(url)
        assert parts.port == port_of(parts.hostname) and parts.path == "/ready"


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
    trainer = container_env(pod_spec(find(docs, "Deployment", "trainer")[0])["containers"][0])
    assert trainer["PAIRLOOP_TRAINER_MODEL_STORE_ROOT"]["value"] == STORE
    api = container_env(pod_spec(find(docs, "Deployment", "orchestrator-api")[0])["containers"][0])
    assert api["PAIRLOOP_ORCHESTRATOR_RUNS_ROOT"]["value"] == f"{STORE}/runs"
    # The Job resumes exactly the directory `pairloop run` creates: MODEL_STORE/runs/RUN_ID.
    script = pod_spec(find(docs, "Job", "pairloop-run")[0])["containers"][0]["command"][2]
    assert f'"{STORE}/runs/$RUN_ID/manifest.json"' in script
    assert "exec pairloop run /config/run.yaml" in script


def test_gpu_overlay_requests_gpus_and_scales_generators() -> None:
    docs = render("overlays/gpu")
    for name in ("generator", "ranker", "trainer"):
        c = pod_spec(find(docs, "Deployment", name)[0])["containers"][0]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
    assert find(docs, "Deployment", "generator")[0]["spec"]["replicas"] > 1
    (pvc,) = [
        p for p in find(docs, "PersistentVolumeClaim") if p["metadata"]["name"] == "model-store"
    ]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cfg = _run_config(docs)
    recipe = load_run_config(REPO / "configs" / "snorkel-mistral-pairrm.yaml")
    exclude = {"services", "run_id"}
    assert cfg.model_dump(exclude=exclude) == recipe.model_dump(exclude=exclude), (
        "k8s/overlays/gpu/run-config.yaml drifted from configs/snorkel-mistral-pairrm.yaml"
    )


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
        if kustomization.endswith("gpu")
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

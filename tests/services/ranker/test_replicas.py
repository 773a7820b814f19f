"""One ranker process, one replica per device (`--devices`): a concurrent load is spread over
every replica, each answer equals a one-replica ranker's, and a bad devices value stops the
service at startup with a one-line reason."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from pairloop.settings import load_settings
from pairloop_local.processes import free_port
from services.ranker.settings import RankerSettings

REPO_ROOT = Path(__file__).resolve().parents[3]


async def test_two_cpu_replicas_share_a_concurrent_load_with_one_replica_scores(
    pairrm_dir: Path,
    pairrm_url: str,
    start_ranker: Any,
    items_factory: Any,
    read_metric: Any,
    tmp_path: Path,
) -> None:
    prompts, candidates = items_factory(21, 12, 4)
    items = [{"prompt": p, "candidates": c} for p, c in zip(prompts, candidates, strict=True)]
    bodies = [{"items": items[i::6]} for i in range(6)]  # 6 requests x 2 items x 12 pairs

    async def rank_all(url: str) -> list[list[list[float]]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            replies = await asyncio.gather(*(client.post("/v1/rank", json=b) for b in bodies))
        for r in replies:
            assert r.status_code == 200, r.text
        return [[res["scores"] for res in r.json()["results"]] for r in replies]

    args = ["--model", str(pairrm_dir), "--devices", "cpu,cpu", "--batch-wait-ms", "20"]
    with start_ranker(args, tmp_path) as url:
        ready = httpx.get(f"{url}/ready", timeout=10).json()
        assert ready["replicas"] == 2 and ready["devices"] == ["cpu", "cpu"], ready
        two = await rank_all(url)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    one = await rank_all(pairrm_url)

    for got, want in zip(two, one, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    requests = [
        read_metric(metrics, "pairloop_ranker_replica_requests_total", replica=r, device="cpu")
        for r in ("0", "1")
    ]
    comparisons = [
        read_metric(metrics, "pairloop_ranker_comparisons_total", replica=r, device="cpu")
        for r in ("0", "1")
    ]
    # Six requests in flight at once: the least-loaded dispatch gives each replica some.
    assert sum(requests) == 6 and min(requests) >= 1, requests
    assert sum(comparisons) == 6 * 24 and min(comparisons) >= 24, comparisons


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--devices", "gpu0"], "'gpu0' is not a device"),
        (["--devices", "cuda:0,cuda:0"], "names one accelerator twice"),
        (["--devices", "cuda,cuda:1"], "names one accelerator twice"),
        (["--devices", "cpu,"], "'' is not a device"),
        (["--device", "cuda:0", "--devices", "cuda:0,cuda:1"], "not both"),
        (["--devices", "cpu,cpu", "--dtype", "float16"], "float16 is not supported on cpu"),
    ],
)
def test_bad_devices_value_is_a_one_line_settings_error(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        load_settings(RankerSettings, flags)
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


def test_devices_list_and_cuda_all_resolve_to_one_device_per_replica() -> None:
    assert RankerSettings().replica_devices() == ["cpu"]
    assert RankerSettings(device="cuda:3").replica_devices() == ["cuda:3"]
    assert RankerSettings(devices=" cuda:0, cuda:1 ").replica_devices() == ["cuda:0", "cuda:1"]
    assert RankerSettings(devices="cuda:all").replica_devices(cuda_count=3) == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
    ]


def test_devices_cuda_all_without_a_gpu_exits_at_startup_with_the_reason(pairrm_dir: Path) -> None:
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this holds on a GPU host too.
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "services.ranker", "--model", str(pairrm_dir)),
            *("--devices", "cuda:all", "--port", str(free_port())),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=""),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "--devices cuda:all: this process sees no CUDA device" in proc.stderr


# A backend through the documented `--backend package.module:build` extension point, whose
# replica 1 finishes starting only when the test opens its gate.
_GATED_BACKEND = """
import asyncio

from pairloop.contracts.ranker import Truncation
from services.ranker.rankers.base import PointwiseRanker

GATE = asyncio.Event()


class Gated(PointwiseRanker):
    backend = "gated"

    def __init__(self, replica):
        self.replica, self.started = replica, False

    async def start(self):
        if self.replica == "1":
            await GATE.wait()
        self.started = True

    @property
    def ready(self):
        return self.started

    async def score_items(self, prompts, candidates, *, request):
        return [([float(len(c)) for c in cs], Truncation(candidates=[False] * len(cs)))
                for cs in candidates]


def build(settings, metrics):
    return Gated(metrics.labels["replica"])
"""


async def test_ready_is_503_until_every_replica_has_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    from services.ranker.app import create_app

    (tmp_path / "gated_replica_backend.py").write_text(_GATED_BACKEND)
    monkeypatch.syspath_prepend(str(tmp_path))
    backend = importlib.import_module("gated_replica_backend")
    settings = RankerSettings(backend="gated_replica_backend:build", model="x", devices="cpu,cpu")
    app = create_app(settings)
    service = app.state.service
    loading = asyncio.create_task(service.load())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ranker") as client:
        async with asyncio.timeout(10):
            while service.loading_state != "1 of 2 replicas ready (cpu, cpu)":
                await asyncio.sleep(0.01)
        r = await client.get("/ready")
        assert r.status_code == 503
        assert "1 of 2 replicas ready (cpu, cpu)" in r.json()["error"]["message"]
        busy = await client.post(
            "/v1/rank", json={"items": [{"prompt": "p", "candidates": ["a", "bb"]}]}
        )
        assert busy.status_code == 503  # no request reaches a half-loaded pool

        backend.GATE.set()
        await asyncio.wait_for(loading, 10)
        r = await client.get("/ready")
        assert r.status_code == 200 and r.json()["replicas"] == 2, r.text
        ranked = await client.post(
            "/v1/rank", json={"items": [{"prompt": "p", "candidates": ["a", "bb"]}]}
        )
        assert ranked.status_code == 200 and ranked.json()["results"][0]["best_index"] == 1
    await service.close()
    sys.modules.pop("gated_replica_backend", None)

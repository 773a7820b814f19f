"""The run config's `local:` section, the stack it describes, the demo config, the secrets file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from orchestrator.config import DEFAULT_JUDGE_MODEL, ConfigError, load_run_config
from orchestrator.demo import DEMO_RANKER_ARGS, _packaged
from orchestrator.local import StackSpec
from orchestrator.local.secrets import load_or_create_admin_token

REPO = Path(__file__).resolve().parents[2]


def test_local_section_becomes_the_stack_spec(write_config: Callable[..., Path]) -> None:
    cfg = load_run_config(
        write_config(
            local={
                "redis": "redis://10.0.0.5:6379/2",
                "generator": {"gpus": [0, 1], "args": ["--tensor-parallel-size", "2"]},
                "ranker": {
                    "backend": "reward-model",
                    "model": "my/rm",
                    "device": "cuda",
                    "gpus": [2],
                },
                "judge": {"model": "/models/judge-rm", "gpus": [3], "port": 8102},
                "trainer": {"gpus": [], "device": "cpu", "port": None},
            }
        )
    )
    spec = StackSpec.from_config(cfg)
    # The judge: a second ranker process, a reward model by default, on its own GPU and port.
    assert spec.judge_args == [
        "--backend",
        "reward-model",
        "--model",
        "/models/judge-rm",
        "--device",
        "cpu",
    ]
    assert spec.service_env["judge"]["CUDA_VISIBLE_DEVICES"] == "3" and spec.ports["judge"] == 8102
    assert spec.base_model == Path(cfg.base_model) and spec.store == Path(cfg.model_store)
    assert spec.service_env["generator"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert spec.service_env["ranker"]["CUDA_VISIBLE_DEVICES"] == "2"
    assert spec.service_env["trainer"]["CUDA_VISIBLE_DEVICES"] == ""  # [] hides every GPU
    assert spec.generator_args == ["--tensor-parallel-size", "2"]
    assert spec.ranker_args[:6] == [
        "--backend",
        "reward-model",
        "--model",
        "my/rm",
        "--devices",
        "cuda:all",  # a replica on each GPU it sees: here GPU 2
    ]
    assert spec.trainer_args == ["--device", "cpu"]
    # A Redis the config names is used as it is: never silently replaced by a private one.
    assert (spec.redis_url, spec.redis_fallback) == ("redis://10.0.0.5:6379/2", False)


def test_local_ranker_on_cuda_keeps_a_replica_on_every_gpu_it_is_given(
    write_config: Callable[..., Path],
) -> None:
    """A ranker on `cuda` with several GPUs runs one replica on each (`--devices cuda:all` over
    the GPUs it sees); the judge keeps one device."""
    cfg = load_run_config(
        write_config(
            local={
                "ranker": {"device": "cuda", "gpus": [2, 3]},
                "judge": {"device": "cuda", "gpus": [2]},
            }
        )
    )
    spec = StackSpec.from_config(cfg)
    assert spec.ranker_args[4:6] == ["--devices", "cuda:all"]
    assert "--device" not in spec.ranker_args
    assert spec.service_env["ranker"]["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert spec.judge_args is not None and spec.judge_args[4:6] == ["--device", "cuda"]
    pinned = load_run_config(write_config(local={"ranker": {"device": "cuda:1"}}))
    assert StackSpec.from_config(pinned).ranker_args[4:6] == ["--device", "cuda:1"]


def test_local_section_defaults_and_errors(write_config: Callable[..., Path]) -> None:
    spec = StackSpec.from_config(load_run_config(write_config()))
    assert spec.judge_args is None and "judge" not in spec.service_env  # no judge unless asked
    judged = load_run_config(write_config(local={"judge": {}})).local.judge
    assert judged is not None
    assert (judged.backend, judged.model) == ("reward-model", DEFAULT_JUDGE_MODEL)
    assert spec.redis_fallback and "CUDA_VISIBLE_DEVICES" not in spec.service_env["generator"]
    with pytest.raises(ConfigError, match=r"local\.redis: .*auto, private or a redis:// URL"):
        load_run_config(write_config(local={"redis": "sometimes"}))
    with pytest.raises(ConfigError, match=r"local\.ranker\.gpu: unknown field"):
        load_run_config(write_config(local={"ranker": {"gpu": 0}}))


def test_where_services_run_does_not_change_the_fingerprint(
    write_config: Callable[..., Path],
) -> None:
    plain = load_run_config(write_config())
    placed = load_run_config(
        write_config(local={"generator": {"gpus": [3]}, "redis": "private", "judge": {}})
    )
    assert plain.fingerprint() == placed.fingerprint()


def test_demo_config_is_configs_demo_yaml_and_its_ranker_is_the_demos() -> None:
    linked = REPO / "configs" / "demo.yaml"
    assert linked.resolve() == _packaged("demo.yaml").resolve()
    cfg = load_run_config(linked)
    assert Path(cfg.prompts.source).is_file()
    assert StackSpec.from_config(cfg).ranker_args[:4] == DEMO_RANKER_ARGS
    assert yaml.safe_load(_packaged("demo.yaml").read_text())["local"]["trainer"]["device"] == "cpu"


def test_admin_token_is_kept_owner_only_and_reused(tmp_path: Path) -> None:
    token = load_or_create_admin_token(tmp_path / "local")
    path = tmp_path / "local" / "secrets.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text()) == {"generator_admin_token": token}
    path.chmod(0o644)
    assert load_or_create_admin_token(tmp_path / "local") == token  # resume finds the same one
    assert path.stat().st_mode & 0o777 == 0o600


def test_an_unfinished_demo_run_is_found_again_a_completed_one_is_not(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    import shutil

    from orchestrator.demo import demo_config, find_unfinished
    from orchestrator.manifest import load_manifest
    from orchestrator.runs import create_run

    store = tmp_path / "store"
    shutil.copytree(tiny_models["llama"], store / "models" / "tiny-llama")
    config = tmp_path / "demo-config.yaml"
    config.write_text(
        yaml.safe_dump(
            demo_config(store=store, base_model=store / "models" / "tiny-llama", iterations=2)
        )
    )
    runs = store / "runs"
    assert find_unfinished(runs, iterations=2) is None
    older = create_run(config, run_id="demo-20260101-000000")
    newer = create_run(config, run_id="demo-20260101-000001")
    assert find_unfinished(runs, iterations=2) == newer  # the newest unfinished one
    assert find_unfinished(runs, iterations=3) is None  # another length is another demo
    m = load_manifest(newer)
    m.status = "completed"
    m.save(newer)
    assert find_unfinished(runs, iterations=2) == older

"""Worker settings, Celery configuration, job parsing and the client's wire format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import redis

from pairloop.errors import ValidationError
from pairloop.jobs import TRAIN_QUEUE, TRAIN_TASK_NAME
from pairloop.train_client import make_train_client, read_train_state, submit_train_job
from services.trainer.__main__ import worker_env
from services.trainer.celery_app import celery_config, create_celery_app
from services.trainer.settings import TrainerSettings
from services.trainer.tasks import parse_job

from .helpers import REPO_ROOT, make_job


def test_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PAIRLOOP_TRAINER_MODEL_STORE_ROOT", str(tmp_path))
    monkeypatch.setenv("PAIRLOOP_TRAINER_SOFT_TIME_LIMIT", "100")
    monkeypatch.setenv("PAIRLOOP_TRAINER_HARD_TIME_LIMIT", "200")
    monkeypatch.setenv("PAIRLOOP_REDIS_URL", "redis://10.0.0.1:6379/3")
    settings = TrainerSettings()
    assert settings.store_root == tmp_path.resolve()
    assert settings.jobs_root == tmp_path.resolve() / ".pairloop-trainer"
    assert (settings.soft_time_limit, settings.hard_time_limit) == (100, 200)
    assert settings.redis_url == "redis://10.0.0.1:6379/3"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"soft_time_limit": 50, "hard_time_limit": 50}, "soft_time_limit must be smaller"),
        ({"hard_time_limit": 500, "visibility_timeout": 500}, "visibility_timeout must be longer"),
    ],
)
def test_inconsistent_limits_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        TrainerSettings(**{"soft_time_limit": 10, **fields})


def test_celery_config_has_the_safety_settings() -> None:
    settings = TrainerSettings(
        redis_url="redis://h:1/0", soft_time_limit=100, hard_time_limit=120, visibility_timeout=600
    )
    conf = celery_config(settings)
    assert conf["broker_url"] == conf["result_backend"] == "redis://h:1/0"
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["accept_content"] == conf["result_accept_content"] == ["json"]
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert (conf["worker_pool"], conf["worker_concurrency"]) == ("prefork", 1)
    assert (conf["task_soft_time_limit"], conf["task_time_limit"]) == (100, 120)
    for key in ("broker_transport_options", "result_backend_transport_options"):
        assert conf[key]["visibility_timeout"] == 600 > conf["task_time_limit"]
    assert conf["worker_max_tasks_per_child"] == 1


def test_app_registers_the_task_by_its_shared_name() -> None:
    app = create_celery_app(TrainerSettings(redis_url="redis://h:1/0"))
    app.loader.import_default_modules()
    import services.trainer.tasks  # noqa: F401  - `include` imports it in a worker
    from services.trainer.celery_app import app as module_app

    task = module_app.tasks[TRAIN_TASK_NAME]
    assert task.acks_late and task.reject_on_worker_lost
    assert app.conf.task_routes[TRAIN_TASK_NAME]["queue"] == TRAIN_QUEUE


def test_parse_job_names_every_missing_field() -> None:
    with pytest.raises(ValidationError) as info:
        parse_job({"run_id": "r", "iteration": 1})
    message = info.value.message
    assert message.startswith("invalid training job:\n")
    for name in ("policy_path", "reference_path", "dataset_path", "output_path"):
        assert f"{name}: Field required" in message
    with pytest.raises(ValidationError, match="must be a JSON object"):
        parse_job("not a job")
    with pytest.raises(ValidationError, match="extra_knob: Extra inputs are not permitted"):
        parse_job(make_job("x").model_dump() | {"extra_knob": 1})
    with pytest.raises(ValidationError, match="max_prompt_length must be smaller"):
        parse_job(
            make_job("x").model_dump()
            | {"hyperparameters": {"max_length": 64, "max_prompt_length": 64}}
        )


def test_worker_env_round_trips_the_settings(tmp_path: Path) -> None:
    settings = TrainerSettings(
        model_store_root=tmp_path, redis_url="redis://h:2/0", keep_checkpoints=True, device="cpu"
    )
    env = worker_env(settings, {})
    assert env["PAIRLOOP_TRAINER_KEEP_CHECKPOINTS"] == "true"
    again = subprocess.run(
        [
            sys.executable,
            "-c",
            "from services.trainer.settings import TrainerSettings as T; print(T().model_dump_json())",
        ],
        env={**env, "PATH": "/usr/bin:/bin"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert TrainerSettings.model_validate_json(again.stdout) == settings


def test_cli_help_lists_flags_and_bad_flags_are_messages() -> None:
    run = [sys.executable, "-m", "services.trainer"]
    shown = subprocess.run([*run, "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert shown.returncode == 0 and "--model-store-root" in shown.stdout
    bad = subprocess.run(
        [*run, "--soft-time-limit", "9", "--hard-time-limit", "5"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "soft_time_limit must be smaller" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_client_sends_json_by_task_name_with_the_job_id(redis_url: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/2"  # no worker listens here
    client = make_train_client(url)
    raw = redis.Redis.from_url(url)
    try:
        job = make_job("wire")
        result = submit_train_job(client, job)
        assert result.id == job.job_id == "wire-iter1"
        assert read_train_state(result).state == "PENDING"
        message = json.loads(raw.lpop(TRAIN_QUEUE))
        assert message["content-type"] == "application/json"
        assert message["headers"]["task"] == TRAIN_TASK_NAME
        assert message["headers"]["id"] == job.job_id
    finally:
        raw.flushdb()
        raw.close()
        client.close()


def test_launched_rank_exits_when_its_owner_dies() -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(gone.stdout)
    code = (
        "import threading\n"
        "from services.trainer.launch_entry import _exit_when_gone\n"
        f"_exit_when_gone({dead_pid}, interval=0.1)\n"
        # Block as a training rank would; only the watchdog's exit can end this process in time.
        "threading.Event().wait()\n"
    )
    rank = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, timeout=30
    )
    assert rank.returncode == 3

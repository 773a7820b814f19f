"""Strategy knobs without training: the accelerate config files (read by accelerate's own loader),
the launch command per strategy and machine, launch settings validation, the derived accumulation,
and what DPOConfig gets under a sharded strategy."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from pairloop.jobs import DPOHyperparameters
from services.trainer.launcher import Rendezvous, accelerate_command
from services.trainer.settings import ACCELERATE_CONFIGS, TrainerSettings
from services.trainer.spec import TrainingSpec

from .helpers import make_job


@pytest.mark.parametrize(
    ("strategy", "kind"),
    [("ddp", "MULTI_GPU"), ("fsdp", "FSDP")],
)
def test_accelerate_configs_load_in_accelerate(strategy: str, kind: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIGS[strategy]))
    assert str(config.distributed_type).endswith(kind)
    if strategy == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_reshard_after_forward"] is True  # full shard
        assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        # Rank 0 reads the weights; the others build empty models and get shards by broadcast.
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True


def _spec(strategy: str, world: int, device: str = "cuda", **hp: object) -> TrainingSpec:
    job = make_job("cmd")
    job = job.model_copy(
        update={"hyperparameters": job.hyperparameters.model_copy(update=dict(hp))}
    )
    return TrainingSpec(
        job=job,
        policy_path="p",
        reference_path="p",
        dataset_path="d",
        dataset_cache="c",
        checkpoints_dir="k",
        staging_dir="s",
        device=device,  # type: ignore[arg-type]  # parametrised with the Literal values
        strategy=strategy,  # type: ignore[arg-type]  # parametrised with the Literal values
        world_size=world,
    )


def _settings() -> TrainerSettings:
    return TrainerSettings(model_store_root=Path("/tmp"), redis_url="redis://x:1/0")


def _flags(argv: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(argv, [*argv[1:], ""], strict=True) if a.startswith("--")}


def test_launch_command_per_strategy_and_machine(tmp_path: Path) -> None:
    settings = TrainerSettings(model_store_root=tmp_path, redis_url="redis://x:1/0")
    fsdp = _flags(accelerate_command(Path("s.json"), settings=settings, spec=_spec("fsdp", 8)))
    assert fsdp["--config_file"] == str(ACCELERATE_CONFIGS["fsdp"])
    assert fsdp["--num_processes"] == "8" and fsdp["--num_machines"] == "1"
    assert fsdp["--fsdp_activation_checkpointing"] == "true"  # "auto" on CUDA
    assert fsdp["--fsdp_offload_params"] == "false"

    offload = _flags(
        accelerate_command(
            Path("s.json"), settings=settings, spec=_spec("fsdp", 8, cpu_offload=True)
        )
    )
    assert offload["--fsdp_offload_params"] == "true"

    # DDP on CPU ranks: torchrun with gloo, no config file (CUDA-only settings there).
    ddp = _flags(accelerate_command(Path("s.json"), settings=settings, spec=_spec("ddp", 2, "cpu")))
    assert "--config_file" not in ddp and "--multi_gpu" in ddp

    # Machine 1 of 2, 8 GPUs each: 16 ranks in all, at machine 0's endpoint; the shipped config
    # files say same_network, so torchrun's static rendezvous at MASTER_ADDR/PORT.
    machine1 = settings.model_copy(
        update={"num_machines": 2, "machine_rank": 1, "rendezvous_endpoint": "10.0.0.1:29500"}
    )
    multi = _flags(accelerate_command(Path("s.json"), settings=machine1, spec=_spec("fsdp", 16)))
    assert multi["--num_processes"] == "16" and multi["--num_machines"] == "2"
    assert multi["--machine_rank"] == "1" and multi["--rdzv_backend"] == "static"
    assert "--same_network" in multi
    assert (multi["--main_process_ip"], multi["--main_process_port"]) == ("10.0.0.1", "29500")
    # CPU ranks (no config file): c10d at the endpoint.
    cpu = _flags(
        accelerate_command(
            Path("s.json"),
            settings=settings,
            spec=_spec("ddp", 2, "cpu"),
            rendezvous=Rendezvous(2, 1, "127.0.0.1:29501"),
        )
    )
    assert cpu["--rdzv_backend"] == "c10d" and "--same_network" not in cpu


@pytest.mark.parametrize("same", [True, False])
def test_the_config_files_same_network_holds_in_accelerate(tmp_path: Path, same: bool) -> None:
    """accelerate's CLI default (false) used to hide the file's `same_network: true`: parsed and
    validated by accelerate itself, the launch now gets the file's value either way."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = tmp_path / "multi_gpu.yaml"
    text = ACCELERATE_CONFIGS["ddp"].read_text()
    assert "same_network: true" in text
    config.write_text(text.replace("same_network: true", f"same_network: {str(same).lower()}"))
    settings = TrainerSettings(
        model_store_root=tmp_path, redis_url="redis://x:1/0", accelerate_config=config
    )
    argv = accelerate_command(
        Path("s.json"),
        settings=settings,
        spec=_spec("ddp", 16),
        rendezvous=Rendezvous(2, 1, "10.0.0.1:29500"),
    )
    args = launch_command_parser().parse_args(argv[3:])
    _validate_launch_command(args)
    assert args.same_network is same
    prepare_multi_gpu_env(args)
    if same:  # torchrun's static rendezvous at machine 0's address
        assert (args.master_addr, args.master_port) == ("10.0.0.1", "29500")
        assert args.rdzv_backend == "static"
    else:
        assert args.rdzv_endpoint == "10.0.0.1:29500" and args.rdzv_backend == "c10d"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_machines": 2}, "needs rendezvous_endpoint"),
        (
            {"num_machines": 2, "machine_rank": 2, "rendezvous_endpoint": "h:1"},
            "below num_machines",
        ),
        ({"rendezvous_endpoint": "no-port"}, "rendezvous_endpoint"),
        ({"strategy": "zero2"}, "strategy"),
        ({"strategy": "deepspeed-zero3"}, "'ddp' or 'fsdp'"),
    ],
)
def test_launch_settings_are_validated(
    tmp_path: Path, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        TrainerSettings(model_store_root=tmp_path, redis_url="redis://x:1/0", **fields)


def test_global_batch_is_kept_on_any_rank_count() -> None:
    hp = DPOHyperparameters(per_device_train_batch_size=8, global_batch_size=128)
    assert [hp.gradient_accumulation_for(n) for n in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 1]
    with pytest.raises(ValueError, match="7 ranks x per_device_train_batch_size 8 = 56"):
        hp.gradient_accumulation_for(7)
    assert DPOHyperparameters().gradient_accumulation_for(8) == 2  # unset: as given
    with pytest.raises(pydantic.ValidationError, match="not a multiple"):
        DPOHyperparameters(per_device_train_batch_size=8, global_batch_size=100)


def test_dpo_config_derives_accumulation_and_leaves_checkpointing_to_fsdp() -> None:
    from services.trainer.dpo import dpo_config

    # FAST_HYPERPARAMETERS: 4 per device; 16 pairs per step over 2 ranks -> accumulation 2.
    spec = _spec("fsdp", 2, "cpu", global_batch_size=16, gradient_checkpointing=True)
    config = dpo_config(spec)
    assert config.gradient_accumulation_steps == 2
    assert config.gradient_checkpointing is False  # FSDP's own, passed at launch
    # Gradients reduce-scattered every micro-batch: no unsharded copy between them (no_sync).
    assert config.accelerator_config.gradient_accumulation_kwargs == {"sync_each_batch": True}
    launch = _flags(accelerate_command(Path("s.json"), settings=_settings(), spec=spec))
    assert launch["--fsdp_activation_checkpointing"] == "true"
    ddp = dpo_config(_spec("ddp", 2, "cpu", global_batch_size=16, gradient_checkpointing=True))
    assert ddp.gradient_checkpointing is True
    assert not (ddp.accelerator_config.gradient_accumulation_kwargs or {}).get("sync_each_batch")

"""`pairloop plan`: parameter counts of known shapes, the byte counts per strategy, the verdicts on
the Snorkel recipe at 8 x 80 GB, and `pairloop run --gpus` refusing before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import load_run_config
from orchestrator.plan import GIB, KNOWN_SHAPES, ModelShape, plan_run, replace_hp, trainer_memory
from pairloop.checkpoints import read_manifest
from pairloop.jobs import DPOHyperparameters

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "snorkel-mistral-pairrm.yaml"
MISTRAL = KNOWN_SHAPES["Mistral-7B-Instruct-v0.2"]
LLAMA2_7B = ModelShape(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
    vocab_size=32000,
)
TINYLLAMA = ModelShape(
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=5632,
    vocab_size=32000,
)


def test_parameter_counts_of_published_models() -> None:
    # As their model cards and `sum(p.numel())` give them.
    assert MISTRAL.parameters == 7_241_732_096
    assert LLAMA2_7B.parameters == 6_738_415_616
    assert TINYLLAMA.parameters == 1_100_048_384
    assert MISTRAL.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2


def test_the_count_from_config_json_matches_the_checkpoint(tiny_models: dict[str, Path]) -> None:
    checked = 0
    for path in tiny_models.values():
        config = json.loads((path / "config.json").read_text())
        if "num_hidden_layers" not in config or "intermediate_size" not in config:
            continue  # the tiny PairRM is not a decoder
        assert ModelShape.from_config(config).parameters == read_manifest(path).num_parameters
        checked += 1
    assert checked >= 2  # the tiny Llama and the tiny Mistral


def test_bytes_per_parameter_by_strategy() -> None:
    hp = DPOHyperparameters(bf16=True, gradient_checkpointing=True)  # float32 master weights
    p = MISTRAL.parameters
    ddp = trainer_memory(MISTRAL, hp, strategy="ddp", gpus=8)
    assert (ddp["weights (master)"], ddp["gradients"], ddp["AdamW moments"]) == (
        4 * p,
        4 * p,
        8 * p,
    )
    assert ddp["reference"] == 2 * p  # frozen, bf16
    assert ddp["DDP gradient buckets"] == 4 * p  # the reducer's flat copy of the gradients
    fsdp = trainer_memory(MISTRAL, hp, strategy="fsdp", gpus=8)
    assert fsdp["weights (master)"] + fsdp["gradients"] + fsdp["AdamW moments"] == 16 * p / 8
    assert fsdp["reference"] == 2 * p / 8 and fsdp["activations"] == ddp["activations"]
    # One FSDP unit (decoder layer) gathered at a time, with the next prefetched and one unit's
    # gradients before their reduce-scatter: never the whole model, for the reference neither.
    assert fsdp["gathered layers"] == 3 * MISTRAL.layer_parameters * 2 < 2 * p / 10
    # DESIGN.md's count: about 145 GB per GPU under DDP with a float32 reference, before activations.
    fp32 = trainer_memory(MISTRAL, replace_hp(hp, bf16=False), strategy="ddp", gpus=8)
    counted = ("activations", "DDP gradient buckets")  # DESIGN.md counts neither
    assert 144e9 < sum(v for k, v in fp32.items() if k not in counted) < 146e9
    precomputed = trainer_memory(
        MISTRAL, replace_hp(hp, precompute_ref_log_probs=True), strategy="fsdp", gpus=8
    )
    assert "reference" not in precomputed
    offloaded = trainer_memory(MISTRAL, replace_hp(hp, cpu_offload=True), strategy="fsdp", gpus=8)
    assert offloaded["weights (master)"] == offloaded["AdamW moments"] == 0
    # Activations grow with the micro-batch; gradient checkpointing keeps only layer inputs.
    small = replace_hp(hp, per_device_train_batch_size=4)
    assert (
        trainer_memory(MISTRAL, small, strategy="fsdp", gpus=8)["activations"]
        < (fsdp["activations"])
    )
    full = trainer_memory(
        MISTRAL, replace_hp(hp, gradient_checkpointing=False), strategy="fsdp", gpus=8
    )
    assert full["activations"] > 3 * fsdp["activations"]


def test_recipe_on_8x80_fits_sharded_and_ddp_is_refused_naming_the_knob() -> None:
    cfg = load_run_config(RECIPE)
    sharded = plan_run(cfg, gpus=8, gpu_memory_gib=80)
    assert sharded.fits and sharded.strategy == "fsdp"
    assert sharded.gradient_accumulation_steps == 2 and sharded.global_batch_size == 128
    trainer = sharded.stages[-1]
    assert 20 * GIB < trainer.total < 40 * GIB
    ddp = plan_run(cfg, gpus=8, gpu_memory_gib=80, strategy="ddp")
    assert not ddp.fits and ddp.stages[-1].total > 120 * GIB
    assert "strategy: fsdp" in ddp.problems[0] and "deepspeed" not in ddp.problems[0]
    # The global batch is kept on 4 GPUs: twice the accumulation.
    assert plan_run(cfg, gpus=4, gpu_memory_gib=80).gradient_accumulation_steps == 4


def _recipe_copy(tmp_path: Path, **dpo: object) -> Path:
    raw = yaml.safe_load(RECIPE.read_text())
    raw["dpo"].update(dpo)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_plan_prints_the_table_and_exits_non_zero_when_it_cannot_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", str(RECIPE), "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "trainer (fsdp, 8 GPUs)" in out and "gradient accumulation 2" in out

    # The table goes to stdout, the refusal to stderr (where every CLI error goes).
    assert main(["plan", str(_recipe_copy(tmp_path, strategy="ddp")), "--gpus", "8"]) == 2
    captured = capsys.readouterr()
    assert "memory per GPU" in captured.out
    assert "cannot fit these GPUs" in captured.err and "strategy: fsdp" in captured.err
    assert "Traceback" not in captured.out + captured.err

    assert main(["plan", str(RECIPE), "--gpus", "6"]) == 2  # 128 pairs do not split over 6 x 8
    assert "per_device_train_batch_size" in capsys.readouterr().err

    # DeepSpeed ZeRO-3 is not offered (nothing runs it in CI): refused naming what is accepted.
    assert main(["plan", str(_recipe_copy(tmp_path, strategy="deepspeed-zero3"))]) == 2
    err = capsys.readouterr().err
    assert "dpo.strategy" in err and "'ddp' or 'fsdp'" in err and "Traceback" not in err


def test_run_with_gpus_checks_the_plan_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = _recipe_copy(tmp_path, strategy="ddp")
    assert main(["run", str(config), "--gpus", "8", "--gpu-memory", "80"]) == 2
    assert "cannot fit these GPUs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --- the plan by phase (time-shared placement) ---------------------------------------------------


def test_time_shared_recipe_uses_every_gpu_in_every_phase_and_beats_dedicated() -> None:
    from orchestrator.phases import Throughput, plan_phases

    cfg = load_run_config(RECIPE)
    assert cfg.placement == "time_shared"
    memory = plan_run(cfg, gpus=8, gpu_memory_gib=80)
    shared = plan_phases(cfg, memory)
    assert [p.phase for p in shared.phases] == ["generation", "ranking", "training", "evaluation"]
    assert all(p.gpus == list(range(8)) and p.fits for p in shared.phases)
    assert shared.idle_gpus == {}
    # Training's memory is the trainer estimate, plus what stays resident: the sleeping
    # generator's context and the ranker's weights.
    training = shared.phases[2]
    trainer = next(s for s in memory.stages if s.stage.startswith("trainer"))
    assert training.bytes_per_gpu > trainer.total
    assert training.parts["generator asleep (CUDA context)"] > 0
    # The figures: 100,000 samples x 400 tokens at 8,000 tokens/s per GPU, 400,000
    # PairRM passes at 185/s per GPU, each divided over the 8 GPUs.
    assert shared.phases[0].seconds == pytest.approx(100_000 * 400 / (8000 * 8))
    assert shared.phases[1].seconds == pytest.approx(400_000 / (185 * 8))
    # The generator's reservation leaves the ranker its largest batch on the shared GPUs.
    assert 0.5 < shared.generator_memory_utilization < 0.9
    # The recipe's judge (evaluation.judge) is a second resident ranker: counted in every phase,
    # it lowers the generator's share; a run without one does not count it.
    judge = "judge resident (weights + CUDA context)"
    assert all(p.parts[judge] > 0 for p in shared.phases)
    unjudged_cfg = cfg.model_copy(
        update={"evaluation": cfg.evaluation.model_copy(update={"judge": None})}
    )
    unjudged = plan_phases(unjudged_cfg, memory)
    assert not any(judge in p.parts for p in unjudged.phases)
    gained = unjudged.generator_memory_utilization - shared.generator_memory_utilization
    assert gained * 80 * GIB == pytest.approx(shared.phases[0].parts[judge])
    # The compose and k8s generators' 0.75 still leaves room for both.
    assert shared.generator_memory_utilization >= 0.75

    dedicated = plan_phases(cfg, memory, placement="dedicated")
    assert dedicated.phases[0].gpus == [0] and dedicated.phases[2].gpus == list(range(1, 8))
    assert dedicated.idle_gpus["generation"] == list(range(1, 8))
    # On paper: ~8 h with generation and ranking on one GPU against ~2 h time-shared.
    assert dedicated.total_seconds > 3 * shared.total_seconds
    assert shared.total_seconds == pytest.approx(
        3 * (sum(p.seconds for p in shared.phases) + 5 + 60)
    )

    # Every assumption is an input: twice the generation speed halves generation's time.
    faster = plan_phases(cfg, memory, throughput=Throughput(generation_tokens_per_s=16000))
    assert faster.phases[0].seconds == pytest.approx(shared.phases[0].seconds / 2)


def test_cli_plan_json_prints_phases_gpus_bytes_and_wall_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["plan", str(RECIPE), "--gpus", "8", "--gpu-memory", "80", "--json"]
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["placement"] == "time_shared" and plan["fits"]
    phases = {p["phase"]: p for p in plan["phases"]}
    assert set(phases) == {"generation", "ranking", "training", "evaluation"}
    for phase in phases.values():
        assert phase["gpu_count"] == 8 and phase["bytes_per_gpu"] > GIB
        assert phase["seconds_per_iteration"] > 0
    assert plan["total_seconds"] == pytest.approx(3 * plan["seconds_per_iteration"], rel=1e-3)
    assert plan["assumptions"]["generation_tokens_per_s"] == 8000.0
    assert plan["stages"][-1]["stage"].startswith("trainer")

    # An override is taken, the text form says the same, and a phase that cannot fit exits 2.
    assert main([*args, "--training-tokens-per-s", "1250"]) == 0
    slower = json.loads(capsys.readouterr().out)
    training = {p["phase"]: p for p in slower["phases"]}["training"]
    assert training["seconds_per_iteration"] == pytest.approx(
        2 * phases["training"]["seconds_per_iteration"], rel=1e-3
    )
    assert main(["plan", str(RECIPE), "--gpus", "8", "--gpu-memory", "80"]) == 0
    text = capsys.readouterr().out
    assert "time_shared placement" in text and "estimated wall time" in text
    assert f"{plan['total_seconds'] / 3600:.2f} h for 3 iterations" in text
    assert main(["plan", str(RECIPE), "--gpus", "8", "--gpu-memory", "24", "--json"]) == 2
    small = json.loads(capsys.readouterr().out)
    assert not small["fits"] and any("phase needs" in p for p in small["problems"])


@pytest.mark.parametrize("name", ["simpo-mistral-pairrm.yaml", "sppo-mistral-pairrm.yaml"])
def test_loss_recipes_fit_8x80_and_only_reference_free_ones_skip_the_reference(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = RECIPE.parent / name
    assert main(["plan", str(path), "--gpus", "8", "--gpu-memory", "80"]) == 0
    cfg = load_run_config(path)
    plan = plan_run(cfg, gpus=8, gpu_memory_gib=80)
    assert plan.fits
    trainer = plan.stages[-1].parts
    if cfg.dpo.loss_type == ["simpo"]:
        assert "reference" not in trainer and cfg.iterations == 1 and cfg.dpo.beta == 2.5
        assert cfg.dpo.simpo_gamma / cfg.dpo.beta == pytest.approx(0.1)
    else:
        assert cfg.dpo.loss_type == ["sppo"] and trainer["reference"] > 0
        assert cfg.ranker.mode == "full"  # SPPO trains on the full mode's win probabilities
    assert "reference" in capsys.readouterr().out or cfg.dpo.loss_type == ["simpo"]


def test_a_reference_free_loss_counts_no_reference_model() -> None:
    hp = DPOHyperparameters(bf16=True, gradient_checkpointing=True)
    assert "reference" in trainer_memory(MISTRAL, hp, strategy="fsdp", gpus=8)
    simpo = replace_hp(hp, loss_type=["simpo"])
    assert "reference" not in trainer_memory(MISTRAL, simpo, strategy="fsdp", gpus=8)


def test_host_memory_per_rank_at_load_train_and_save() -> None:
    """Rank 0 reads the float32 policy and the bf16 reference; under FSDP the other ranks build
    them empty, under DDP every rank reads both; the save holds one published file at a time."""
    from orchestrator.plan import RUNTIME_HOST_BYTES, trainer_host_memory

    hp = DPOHyperparameters(bf16=True, gradient_checkpointing=True)
    p = MISTRAL.parameters
    rank0 = trainer_host_memory(MISTRAL, hp, strategy="fsdp", gpus=8, rank=0)
    other = trainer_host_memory(MISTRAL, hp, strategy="fsdp", gpus=8, rank=1)
    ddp1 = trainer_host_memory(MISTRAL, hp, strategy="ddp", gpus=8, rank=1)
    assert rank0["load"]["policy (whole, read by this rank)"] == 4 * p
    assert rank0["load"]["reference (whole)"] == 2 * p
    assert 40 * GIB < sum(rank0["load"].values()) < 46 * GIB  # the issue's ~43 GB per rank
    assert sum(other["load"].values()) < 3 * GIB  # runtime only: no copy of either model
    assert sum(ddp1["load"].values()) == sum(rank0["load"].values())  # DDP: every rank reads
    # Save: at most one 5 GB file of bf16 tensors and the tensor being gathered; no full copy.
    assert sum(rank0["save"].values()) < 10 * GIB
    # On CPU ranks the training state lives in host memory: the GPU parts plus the runtime.
    cpu = trainer_host_memory(MISTRAL, replace_hp(hp, bf16=False), strategy="fsdp", gpus=8,
                              rank=0, device="cpu")  # fmt: skip
    device = trainer_memory(MISTRAL, replace_hp(hp, bf16=False), strategy="fsdp", gpus=8)
    assert sum(cpu["train"].values()) == RUNTIME_HOST_BYTES + sum(device.values())


def test_the_optimizer_state_is_the_configured_optimizers() -> None:
    """The SPPO recipe trains with RMSprop: one moment per parameter, not AdamW's two."""
    from orchestrator.plan import trainer_disk

    sppo = load_run_config(RECIPE.with_name("sppo-mistral-pairrm.yaml"))
    assert sppo.dpo.optim == "rmsprop"
    p = MISTRAL.parameters
    rmsprop = trainer_memory(MISTRAL, sppo.dpo, strategy="fsdp", gpus=8)
    adamw = trainer_memory(
        MISTRAL, replace_hp(sppo.dpo, optim="adamw_torch"), strategy="fsdp", gpus=8
    )
    assert rmsprop["optimizer state (rmsprop, 1 moment)"] == 4 * p / 8
    assert adamw["AdamW moments"] == 8 * p / 8
    assert sum(adamw.values()) - sum(rmsprop.values()) == 4 * p / 8
    assert (
        trainer_memory(
            MISTRAL, replace_hp(sppo.dpo, optim="paged_adamw_8bit"), strategy="ddp", gpus=1
        )["optimizer state (paged_adamw_8bit, 8-bit)"]
        == 2 * p
    )
    unknown = trainer_memory(MISTRAL, replace_hp(sppo.dpo, optim="novel"), strategy="ddp", gpus=1)
    assert unknown["optimizer state (novel: counted as AdamW's 2 moments)"] == 8 * p
    disk = trainer_disk(MISTRAL, sppo.dpo)
    assert disk["resume checkpoints (x2, until published)"] == 2 * 8 * p  # fp32 weights + 1 moment


def test_a_multi_machine_job_is_planned_over_every_machines_gpus() -> None:
    """dpo.num_machines 2 on 8 GPUs each: FSDP shards over 16 ranks and the accumulation follows
    the 16, while host memory stays one machine's 8 ranks."""
    recipe = load_run_config(RECIPE)
    two = recipe.model_copy(update={"dpo": replace_hp(recipe.dpo, num_machines=2)})
    one = plan_run(recipe, gpus=8, gpu_memory_gib=80, shape=MISTRAL)
    both = plan_run(two, gpus=8, gpu_memory_gib=80, shape=MISTRAL)
    sixteen = plan_run(recipe, gpus=16, gpu_memory_gib=80, shape=MISTRAL)
    assert both.stages[-1].parts == sixteen.stages[-1].parts != one.stages[-1].parts
    assert both.stages[-1].stage == "trainer (fsdp, 2 machines x 8 GPUs)"
    assert both.gradient_accumulation_steps == sixteen.gradient_accumulation_steps
    assert one.gradient_accumulation_steps is not None
    assert both.gradient_accumulation_steps == one.gradient_accumulation_steps // 2
    memory = both.training_memory()
    assert (memory["ranks"], memory["machines"], memory["ranks_per_machine"]) == (16, 2, 8)
    # One machine's host memory: its 8 ranks, each with 16-way shards.
    assert both.trainer_machine_host_peak < sixteen.trainer_machine_host_peak


def test_disk_per_iteration_counts_resume_checkpoints_until_published() -> None:
    from orchestrator.plan import trainer_disk

    disk = trainer_disk(MISTRAL, DPOHyperparameters())
    p = MISTRAL.parameters
    assert disk["published weights"] == 2 * p  # bf16, as Mistral ships
    assert disk["resume checkpoints (x2, until published)"] == 2 * 12 * p  # fp32 + AdamW


def test_cli_plan_json_carries_host_and_disk_and_host_memory_refuses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["plan", str(RECIPE), "--gpus", "8", "--gpu-memory", "80", "--json"]
    assert main([*argv, "--host-memory", "128"]) == 0
    out = json.loads(capsys.readouterr().out)
    training = out["training"]
    assert training["ranks"] == 8 and training["gradient_accumulation_steps"] == 2
    assert training["host"]["bytes"] == max(
        phase["bytes"] for phase in training["host"]["rank0"].values()
    )
    assert training["host"]["machine_bytes"] < 128 * GIB
    assert training["disk"]["bytes"] > training["disk"]["parts"]["published weights"]
    # 8 ranks, rank 0 reading ~43 GB: 48 GiB of host memory is not enough; said on stderr.
    assert main([*argv, "--host-memory", "48"]) == 2
    captured = capsys.readouterr()
    assert "host memory" in captured.err and "rank 0" in captured.err
    assert json.loads(captured.out)["fits"] is False


def test_plan_ranking_phase_has_one_ranker_replica_per_gpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["plan", str(RECIPE), "--gpus", "8", "--gpu-memory", "80"]
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    ranking = {p["phase"]: p for p in plan["phases"]}["ranking"]
    assert plan["ranker"] == {
        "replicas": 8,
        "gpus": ranking["gpus"],
        "devices_setting": "PAIRLOOP_RANKER_DEVICES=cuda:all",
        "requests_in_flight": 16,
    }
    assert ranking["gpus"] == list(range(8)) and "one PairRM replica per GPU" in ranking["note"]
    assert main(args) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "one PairRM replica on each of GPUs 0, 1, 2, 3, 4, 5, 6, 7 (8 replicas" in text
    # Dedicated placement: the ranker's replicas are on the generation GPUs only.
    cfg = load_run_config(RECIPE)
    from orchestrator.phases import plan_phases

    dedicated = plan_phases(
        cfg, plan_run(cfg, gpus=8, gpu_memory_gib=80), placement="dedicated", generation_gpus=2
    )
    assert dedicated.ranker_json()["replicas"] == 2 and dedicated.ranker_json()["gpus"] == [0, 1]

"""The plan by phase: which GPUs each phase of an iteration uses, its bytes per GPU, its wall time.

    pairloop plan configs/snorkel-mistral-pairrm.yaml --gpus 8 --gpu-memory 80 [--json]

An iteration runs its phases one after the other (the loop is sequential): generation, ranking,
training, evaluation. Where they run is the run config's `placement`:

- time_shared (the recipe, one node): every phase uses every GPU. The generator runs one
  data-parallel vLLM engine per GPU; the ranker, one process, keeps a PairRM replica (~1.7 GB)
  resident on every GPU (`PAIRLOOP_RANKER_DEVICES=cuda:all`) and the orchestrator keeps two
  ranking requests per replica in flight (`orchestrator.stages.rank`);
  before training the generator releases its memory (vLLM sleep level 2 keeps only its CUDA
  context), the trainer's ranks take all GPUs, and the generator wakes onto the new policy.
  Generation shares each GPU with the resident ranker, so the generator's
  `gpu_memory_utilization` must leave the ranker its largest batch: the plan says how much.
- dedicated: generation and ranking on `generation_gpus` GPUs (default 1: compose's CPU/dev
  layout; a ranker replica on each), training on the rest; the GPUs of the idle side wait.

Wall time comes from throughput assumptions per GPU (`Throughput`; every figure is a CLI flag
of `pairloop plan`), measured or published for the recipe's 7B model on one H100-class GPU and
scaled by parameter count for other models (decoding and training are bound by the weights'
FLOPs and bytes, both linear in parameters). They are assumptions, not measurements of this run:
bench/generator_sleep_gpu.py measures the generator's on the GPU at hand.

Training's memory is the trainer estimate of `orchestrator.plan` (its own issue), read from
the `Plan`; this module adds the phases around it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from orchestrator.config import RunConfig
from orchestrator.plan import GIB, HEADROOM, Plan, ranker_memory
from orchestrator.stages.rank import rank_concurrency

__all__ = [
    "GENERATOR_ASLEEP_BYTES",
    "PhaseEstimate",
    "PhasePlan",
    "Throughput",
    "generator_memory_parts",
    "plan_phases",
]

Placement = Literal["dedicated", "time_shared"]

# Mistral-7B-Instruct-v0.2: the model the default throughputs are stated for.
REFERENCE_PARAMETERS = 7_241_732_096
# What a vLLM engine keeps on its GPU in sleep level 2: its CUDA context and NCCL buffers.
GENERATOR_ASLEEP_BYTES = 1.0 * GIB
# A resident PyTorch process's CUDA context (the ranker's, beside its weights).
CUDA_CONTEXT_BYTES = 0.5 * GIB


@dataclass(frozen=True)
class Throughput:
    """Per-GPU speeds for the recipe's 7B model (bf16) on one H100-class GPU, and the work shapes.

    The defaults are the issue's on-paper figures: 100,000 samples x ~400 tokens in ~1.4 h
    (~8,000 generated tokens/s per GPU, vLLM batched decoding), ~400,000 PairRM passes in ~0.6 h
    (~185 passes/s), and FSDP DPO at ~2,500 tokens/s per GPU (policy forward + backward with
    gradient checkpointing + reference forward, ~10 x 7.2e9 FLOPs per token: ~18% of an H100's
    bf16 peak). A sleep level-2 release takes seconds; a wake reloads 7B weights from the shared
    store (about a minute).
    """

    generation_tokens_per_s: float = 8000.0
    ranking_passes_per_s: float = 185.0
    training_tokens_per_s: float = 2500.0
    response_tokens: int = 400
    prompt_tokens: int = 200
    release_s: float = 5.0
    wake_s: float = 60.0

    def scaled(self, parameters: int) -> tuple[float, float]:
        """(generation, training) tokens/s per GPU for a model of `parameters`."""
        ratio = REFERENCE_PARAMETERS / max(parameters, 1)
        return self.generation_tokens_per_s * ratio, self.training_tokens_per_s * ratio


@dataclass
class PhaseEstimate:
    """One phase of an iteration: its GPUs, its bytes per GPU by part, its seconds."""

    phase: str
    gpus: list[int]
    parts: dict[str, float]
    budget: float
    seconds: float
    work: str
    note: str = ""

    @property
    def bytes_per_gpu(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.bytes_per_gpu <= self.budget

    def as_json(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "gpus": self.gpus,
            "gpu_count": len(self.gpus),
            "bytes_per_gpu": round(self.bytes_per_gpu),
            "parts": {k: round(v) for k, v in self.parts.items()},
            "budget_bytes": round(self.budget),
            "fits": self.fits,
            "seconds_per_iteration": round(self.seconds, 1),
            "work": self.work,
            "note": self.note,
        }


@dataclass
class PhasePlan:
    placement: Placement
    iterations: int
    phases: list[PhaseEstimate]
    switch_seconds: float  # release + wake (time_shared) per iteration
    throughput: Throughput
    generator_memory_utilization: float  # the most vLLM may take so the rest still fits
    idle_gpus: dict[str, list[int]] = field(default_factory=dict)
    ranker_gpus: list[int] = field(default_factory=list)  # one PairRM replica on each
    ranking_requests: int = 0  # in flight at once: what the rank stage will keep (rank_concurrency)

    def ranker_json(self) -> dict[str, Any]:
        """How the ranker serves the ranking phase: a replica per GPU, in one process."""
        return {
            "replicas": len(self.ranker_gpus),
            "gpus": self.ranker_gpus,
            # The container (compose device_ids, a pod's GPU limit) sees exactly these GPUs.
            "devices_setting": "PAIRLOOP_RANKER_DEVICES=cuda:all",
            "requests_in_flight": self.ranking_requests,
        }

    @property
    def seconds_per_iteration(self) -> float:
        return sum(p.seconds for p in self.phases) + self.switch_seconds

    @property
    def total_seconds(self) -> float:
        return self.iterations * self.seconds_per_iteration

    @property
    def problems(self) -> list[str]:
        return [
            f"{p.phase} phase needs {p.bytes_per_gpu / GIB:.1f} GiB per GPU, more than "
            f"{p.budget / GIB:.1f} GiB"
            for p in self.phases
            if not p.fits
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "iterations": self.iterations,
            "phases": [p.as_json() for p in self.phases],
            "switch_seconds_per_iteration": round(self.switch_seconds, 1),
            "seconds_per_iteration": round(self.seconds_per_iteration, 1),
            "total_seconds": round(self.total_seconds, 1),
            "total_hours": round(self.total_seconds / 3600, 2),
            "generator_gpu_memory_utilization_max": round(self.generator_memory_utilization, 3),
            "idle_gpus": self.idle_gpus,
            "ranker": self.ranker_json(),
            "assumptions": asdict(self.throughput),
        }


def _passes_per_prompt(cfg: RunConfig, n: int) -> int:
    """PairRM forward passes to rank n candidates: every ordered pair (full, as PairRM's own
    `rank`), or n-1 comparisons in both orders (bubble)."""
    return n * (n - 1) if cfg.ranker.mode == "full" else 2 * (n - 1)


def plan_phases(
    cfg: RunConfig,
    plan: Plan,
    *,
    placement: Placement | None = None,
    throughput: Throughput | None = None,
    generation_gpus: int = 1,
    ranker_max_batch_tokens: int = 16384,
) -> PhasePlan:
    """The phases of `cfg` on `plan.gpus` GPUs of `plan.gpu_memory_gib` GiB (one node).

    `plan` is `orchestrator.plan.plan_run`'s: its trainer estimate is training's memory.
    """
    tp = throughput or Throughput()
    where: Placement = placement or cfg.placement
    n_gpus, gpu_bytes = plan.gpus, plan.gpu_memory_gib * GIB
    budget = gpu_bytes * HEADROOM
    gen_tps, train_tps = tp.scaled(plan.parameters)
    trainer = next(s for s in plan.stages if s.stage.startswith("trainer"))
    generator = generator_memory_parts(cfg, plan)
    ranker = ranker_memory(ranker_max_batch_tokens)
    ranker_resident = {
        "ranker resident (weights + CUDA context)": ranker["weights (fp32)"] + CUDA_CONTEXT_BYTES
    }
    # The evaluations' judge (`evaluation.judge`) is a second resident ranker process beside the
    # first, counted at the ranker's resident size: the shipped judge (a 0.6B reward model, ~1.2
    # GB in bf16) is smaller than PairRM in float32 (a larger judge needs its own figures).
    judge_resident = (
        {"judge resident (weights + CUDA context)": sum(ranker_resident.values())}
        if cfg.evaluation.enabled and cfg.evaluation.judge
        else {}
    )

    everything = list(range(n_gpus))
    if where == "time_shared":
        gen_gpus = rank_gpus = train_gpus = everything
        idle: dict[str, list[int]] = {}
    else:
        split = min(max(generation_gpus, 1), n_gpus - 1) if n_gpus > 1 else n_gpus
        gen_gpus = rank_gpus = everything[:split]
        train_gpus = everything[split:] or everything
        idle = {"generation": train_gpus, "ranking": train_gpus, "training": gen_gpus}

    k = cfg.prompts.per_iteration
    samples = k * cfg.samples_per_prompt
    gen_tokens = samples * tp.response_tokens
    passes = k * _passes_per_prompt(cfg, cfg.samples_per_prompt)
    pairs = k * (1 - cfg.pairs.test_fraction)
    seq = min(cfg.dpo.max_length, tp.prompt_tokens + tp.response_tokens)
    train_tokens = pairs * 2 * seq * cfg.dpo.num_train_epochs
    ev = cfg.evaluation
    eval_prompts = cfg.prompts.eval_prompts if ev.prompts is None else (ev.prompts.limit or 805)
    eval_samples = eval_prompts * sum(ev.best_of) if ev.enabled else 0
    eval_passes = (
        eval_prompts * sum(n * (n - 1) for n in ev.best_of if n > 1)
        + eval_prompts * 2 * 2  # judged vs base and vs previous, both orders
        if ev.enabled
        else 0
    )

    # vLLM reserves gpu_memory_utilization of each GPU it runs on, and the ranker shares those
    # GPUs (in both placements): what the ranker's largest batch needs bounds that fraction.
    needs = sum(generator.values())
    vllm_max = (budget - sum(ranker.values()) - sum(judge_resident.values())) / gpu_bytes
    reserved = {"generator (vLLM reservation)": max(needs, vllm_max * gpu_bytes)}
    ranker_parts = {f"ranker {name}": v for name, v in ranker.items()}

    gen_parts = {**reserved, **ranker_resident, **judge_resident}
    # In evaluation one of the two batches at a time (picking best-of-n, then judging).
    rank_parts = {**reserved, **ranker_parts, **judge_resident}
    train_parts = dict(trainer.parts)
    if where == "time_shared":
        train_parts["generator asleep (CUDA context)"] = GENERATOR_ASLEEP_BYTES
        train_parts.update(ranker_resident)
        train_parts.update(judge_resident)

    in_flight = rank_concurrency(cfg.services.concurrency, len(rank_gpus))
    phases = [
        PhaseEstimate(
            "generation",
            gen_gpus,
            gen_parts,
            budget,
            gen_tokens / (gen_tps * len(gen_gpus)),
            f"{samples:,} samples x {tp.response_tokens} tokens = {gen_tokens / 1e6:.1f}M tokens",
            note=f"one data-parallel vLLM engine per GPU; it needs {needs / GIB:.1f} GiB of its "
            f"reservation ({', '.join(generator)}), the rest is more KV cache",
        ),
        PhaseEstimate(
            "ranking",
            rank_gpus,
            rank_parts,
            budget,
            passes / (tp.ranking_passes_per_s * len(rank_gpus)),
            f"{passes:,} PairRM passes ({cfg.ranker.mode} mode)",
            note=f"one PairRM replica per GPU in one ranker process (--devices cuda:all), "
            f"{in_flight} requests in flight; the generator stays "
            "loaded, idle",
        ),
        PhaseEstimate(
            "training",
            train_gpus,
            train_parts,
            budget,
            train_tokens / (train_tps * len(train_gpus)),
            f"{pairs:,.0f} pairs x 2 x {seq} tokens x {cfg.dpo.num_train_epochs:g} epochs = "
            f"{train_tokens / 1e6:.1f}M tokens",
            note=trainer.stage
            + ("; the generator is released (sleep level 2)" if where == "time_shared" else ""),
        ),
    ]
    if ev.enabled:
        phases.append(
            PhaseEstimate(
                "evaluation",
                gen_gpus,
                dict(rank_parts),
                budget,
                eval_samples * tp.response_tokens / (gen_tps * len(gen_gpus))
                + eval_passes / (tp.ranking_passes_per_s * len(rank_gpus)),
                f"{eval_samples:,} samples (best-of {ev.best_of}) and {eval_passes:,} passes",
                note="generation and judging of the held-out prompts, on the generation GPUs",
            )
        )
    switch = tp.release_s + tp.wake_s if where == "time_shared" else 0.0
    return PhasePlan(
        placement=where,
        iterations=cfg.iterations,
        phases=phases,
        switch_seconds=switch,
        throughput=tp,
        generator_memory_utilization=vllm_max,
        idle_gpus=idle,
        ranker_gpus=rank_gpus,
        ranking_requests=in_flight,
    )


def generator_memory_parts(cfg: RunConfig, plan: Plan) -> dict[str, float]:
    """The generator estimate of `plan` (one engine: weights and the KV cache it needs)."""
    for stage in plan.stages:
        if stage.stage.startswith("generator"):
            return dict(stage.parts)
    raise ValueError("the plan has no generator estimate")  # pragma: no cover - plan_run has one

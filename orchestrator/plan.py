"""`pairloop plan`: will this run config fit these GPUs? Memory per GPU of each stage, by count.

    pairloop plan configs/snorkel-mistral-pairrm.yaml --gpus 8 --gpu-memory 80

Estimated from the base model's `config.json` (no weights are read): the generator (bf16
weights and the KV cache its in-flight sequences need), the ranker (PairRM's weights and its
largest forward pass) and the trainer under its strategy: float32 master weights, gradients,
AdamW's two moments, the reference model (bf16 when compute is bf16; none when its log-probs are
precomputed or LoRA disables the adapter for it), the layer FSDP gathers at a time (the
reference is sharded per decoder layer like the policy; gradients are reduce-scattered every
accumulation micro-batch, so none stay unsharded), and activations (layer inputs kept by
gradient checkpointing, one layer recomputed, float32 logits of chosen + rejected in TRL's
log-prob chunks). Host memory per training rank (`trainer_host_memory`) at load (rank 0 reads
the policy and the reference; the others build them empty), in training and at the save (one
safetensors file's worth gathered at a time), and disk per iteration (`trainer_disk`): the
published weights and the resume checkpoints kept until they are published. Each stage must
fit one GPU's memory less `HEADROOM` (the CUDA context, NCCL buffers and allocator
fragmentation), the generator within vLLM's `gpu_memory_utilization`. The derived gradient accumulation keeps the recipe's global batch.

The counts are per GPU and ignore what the libraries allocate beyond them (temporary buffers of
a few hundred MB); bench/trainer_dpo_gpu.py holds them against measured peaks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import RunConfig
from pairloop.jobs import DPOHyperparameters, LoraSettings, Strategy
from pairloop.losses import needs_reference

__all__ = [
    "DEFAULT_STRATEGY",
    "GIB",
    "HEADROOM",
    "KNOWN_SHAPES",
    "RUNTIME_HOST_BYTES",
    "ModelShape",
    "Plan",
    "PlanError",
    "StageEstimate",
    "generator_memory",
    "load_shape",
    "optimizer_state",
    "plan_run",
    "ranker_memory",
    "trainer_disk",
    "trainer_host_memory",
    "trainer_memory",
]

GIB = 1 << 30
HEADROOM = 0.90  # share of a GPU's memory a stage may plan to use
VLLM_GPU_MEMORY_UTILIZATION = 0.90  # vLLM's default, the generator's setting's default
DEFAULT_STRATEGY: Strategy = "fsdp"  # the trainer worker's default (PAIRLOOP_TRAINER_STRATEGY)
# Prompts are cut to this many tokens at admission when the run config says nothing shorter.
DEFAULT_PROMPT_TOKENS = 512
# Host memory of one training rank before any model: Python, torch, transformers, TRL, datasets.
# Measured: 0.84 GiB RSS after the trainer's imports on the CPU stack (bench/trainer_memory.py,
# `runtime_rss_bytes`). A CUDA rank also maps the CUDA runtime, cuBLAS and NCCL: ~2 GiB more, an
# estimate until bench/trainer_dpo_gpu.py measures it.
RUNTIME_HOST_BYTES = 0.85 * GIB
CUDA_RUNTIME_HOST_BYTES = 2.0 * GIB
# TRL 1.16 computes the chosen/rejected log-probs in chunks of this many tokens (its fused LM
# head), so the float32 logits of at most one chunk exist at a time.
LOGPROB_CHUNK_TOKENS = 32768
DEFAULT_SAVE_TOTAL_LIMIT = 2  # the trainer worker's PAIRLOOP_TRAINER_SAVE_TOTAL_LIMIT
DEFAULT_MAX_SHARD_BYTES = 5e9  # the trainer worker's PAIRLOOP_TRAINER_PUBLISH_MAX_SHARD_SIZE


class PlanError(ValueError):
    """The plan cannot be made (no model config); the message says what to provide."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama/Mistral-style decoder (or an encoder, for the ranker)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size / num_attention_heads
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """From a Hugging Face `config.json` dict (Llama, Mistral, Qwen2 and the like)."""
        try:
            heads = int(config["num_attention_heads"])
            return cls(
                hidden_size=int(config["hidden_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                intermediate_size=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                head_dim=int(config.get("head_dim") or 0),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"the model config lacks a decoder dimension: {exc}") from None

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def layer_parameters(self) -> int:
        """One decoder layer: attention (GQA), SwiGLU MLP, two RMSNorms."""
        h, d = self.hidden_size, self.head_size
        attention = h * self.num_attention_heads * d * 2 + h * self.num_key_value_heads * d * 2
        return attention + 3 * h * self.intermediate_size + 2 * h

    @property
    def embedding_parameters(self) -> int:
        """Input embedding, output head (unless tied) and the final norm."""
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def parameters(self) -> int:
        return self.num_hidden_layers * self.layer_parameters + self.embedding_parameters

    def lora_parameters(self, r: int) -> int:
        """LoRA on every linear layer ("all-linear"): r x (in + out) per projection."""
        h, d, i = self.hidden_size, self.head_size, self.intermediate_size
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        per_layer = r * ((h + q) * 2 + (h + kv) * 2 + (h + i) * 3)
        return self.num_hidden_layers * per_layer

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_size * dtype_bytes


# Shapes of models the recipes name, for planning before the weights are downloaded.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "Mistral-7B-Instruct-v0.2": ModelShape(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32000,
        max_position_embeddings=32768,
    ),
}
# PairRM = DeBERTa-v3-large (llm-blender/PairRM's backbone): 24 layers, hidden 1024, 128k vocab.
PAIRRM = ModelShape(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    intermediate_size=4096,
    vocab_size=128100,
    tie_word_embeddings=True,
)
PAIRRM_SEQUENCE = 1224 + 2 * 412  # source + two candidates, PairRM's limits


def load_shape(base_model: str | Path, model_config: Path | None = None) -> tuple[ModelShape, str]:
    """The base model's shape and where it came from: --model-config, its config.json, or a
    known shape for its directory name."""
    path = model_config or Path(base_model) / "config.json"
    if path.is_file():
        try:
            return ModelShape.from_config(json.loads(path.read_text())), str(path)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{path} is not valid JSON: {exc}") from None
    if model_config is not None:
        raise PlanError(f"--model-config {model_config} does not exist")
    name = Path(base_model).name
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name], f"built-in shape of {name} (no {path} yet)"
    raise PlanError(
        f"no config.json at {path}: download the base model first, or pass --model-config with "
        "its config.json"
    )


@dataclass
class StageEstimate:
    """One stage's memory per GPU, by part (bytes), against what it may use."""

    stage: str
    parts: dict[str, float]
    budget: float
    note: str = ""
    knobs: list[str] = field(default_factory=list)  # what to turn when it does not fit

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


@dataclass
class Plan:
    gpus: int
    gpu_memory_gib: float
    strategy: Strategy
    stages: list[StageEstimate]
    gradient_accumulation_steps: int | None
    global_batch_size: int
    shape_source: str
    parameters: int
    problems: list[str]
    # Host memory per training rank by phase (rank 0, which reads and writes the weights, and
    # any other rank), disk per iteration, and the host memory checked against (GiB; None: not).
    trainer_host: dict[str, dict[str, float]] = field(default_factory=dict)
    trainer_host_other_ranks: dict[str, dict[str, float]] = field(default_factory=dict)
    trainer_disk: dict[str, float] = field(default_factory=dict)
    host_memory_gib: float | None = None
    machines: int = 1  # dpo.num_machines: `gpus` is one machine's

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def trainer_host_peak(self) -> float:
        """Rank 0's host bytes at its worst phase."""
        return max((sum(v.values()) for v in self.trainer_host.values()), default=0.0)

    @property
    def trainer_machine_host_peak(self) -> float:
        """One machine's host bytes for its training ranks: rank 0's peak + the others'."""
        other = max((sum(v.values()) for v in self.trainer_host_other_ranks.values()), default=0)
        return self.trainer_host_peak + (self.gpus - 1) * other

    def training_memory(self) -> dict[str, Any]:
        """The training memory terms as JSON: GPU bytes per rank, host bytes per rank, disk."""
        trainer = self.stages[-1]

        def phases(by_phase: dict[str, dict[str, float]]) -> dict[str, Any]:
            return {k: {"bytes": sum(v.values()), "parts": v} for k, v in by_phase.items()}

        return {
            "strategy": self.strategy,
            "ranks": self.gpus * self.machines,
            "machines": self.machines,
            "ranks_per_machine": self.gpus,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "gpu": {"bytes": trainer.total, "parts": trainer.parts, "budget": trainer.budget},
            "host": {
                "bytes": self.trainer_host_peak,
                "rank0": phases(self.trainer_host),
                "other_ranks": phases(self.trainer_host_other_ranks),
                "machine_bytes": self.trainer_machine_host_peak,
                "budget": (
                    self.host_memory_gib * GIB * HEADROOM
                    if self.host_memory_gib is not None
                    else None
                ),
            },
            "disk": {"bytes": sum(self.trainer_disk.values()), "parts": self.trainer_disk},
        }


def _dtype_bytes(name: str) -> int:
    return 4 if name in ("float32", "auto") else 2


def optimizer_state(optim: str, w: int) -> tuple[str, float]:
    """(label, bytes per trainable parameter) of the optimizer state of TRL's `optim` name.

    AdamW keeps two moments in the master dtype; Lion one; RMSprop and Adagrad one (the
    Trainer builds RMSprop without momentum); SGD none (no momentum by default); Adafactor's
    factored second moment is a row and a column per matrix (counted as 0). bitsandbytes' 8-bit
    optimizers keep one byte per moment. A name not listed is counted as AdamW, and says so.
    """
    name = optim.lower()
    moments = 1 if "lion" in name else 2
    if "8bit" in name:
        return f"optimizer state ({optim}, 8-bit)", float(moments)
    if "lion" in name or "rmsprop" in name or "adagrad" in name:
        return f"optimizer state ({optim}, 1 moment)", float(w)
    if name.startswith("sgd") or name.startswith("adafactor"):
        return f"optimizer state ({optim}, none counted)", 0.0
    if name.startswith("adam"):
        return "AdamW moments", 2.0 * w
    return f"optimizer state ({optim}: counted as AdamW's 2 moments)", 2.0 * w


def activation_bytes(shape: ModelShape, hp: DPOHyperparameters, *, checkpointing: bool) -> float:
    """One micro-batch's activations: chosen + rejected sequences of max_length tokens."""
    tokens = 2 * hp.per_device_train_batch_size * hp.max_length
    c = 2 if hp.bf16 is not False else 4  # compute dtype (bf16 on a GPU by default)
    h, i = shape.hidden_size, shape.intermediate_size
    kv = shape.num_key_value_heads * shape.head_size
    # Values one layer keeps for its backward (memory-efficient attention: no T x T scores).
    per_layer = tokens * (6 * h + 2 * kv + 4 * i) * c
    if checkpointing:
        layers = shape.num_hidden_layers * tokens * h * c + per_layer  # inputs + one recomputed
    else:
        layers = shape.num_hidden_layers * per_layer
    # float32 logits and their log-softmax, one chunk of TRL's fused head at a time.
    logits = 2 * min(tokens, LOGPROB_CHUNK_TOKENS) * shape.vocab_size * 4
    return layers + logits


def trainer_memory(
    shape: ModelShape,
    hp: DPOHyperparameters,
    *,
    strategy: Strategy,
    gpus: int,
    lora: LoraSettings | None = None,
    same_reference: bool = False,
) -> dict[str, float]:
    """Bytes per GPU of one training rank, by part, at its peak (the backward pass).

    Gradient accumulation adds nothing under FSDP: the trainer reduce-scatters every
    micro-batch (`sync_each_batch`, services/trainer/dpo.py), where accelerate's default
    `no_sync` would keep the whole model's unsharded gradients between micro-batches
    (2 bytes per parameter in bf16: 13.5 GiB at 7B). Under DDP the gradients are whole anyway.
    """
    p = shape.parameters
    w = _dtype_bytes(hp.dtype)
    c = 2 if hp.bf16 is not False else w
    checkpointing = hp.gradient_checkpointing is not False
    trainable = shape.lora_parameters(lora.r) if lora is not None else p
    shard = gpus if strategy != "ddp" else 1
    parts: dict[str, float] = {}
    if lora is not None:
        parts["weights (frozen base)"] = p * w / shard
        label, per_param = optimizer_state(hp.optim, w)
        parts[f"LoRA weights + grads + {label}"] = trainable * (w + w + per_param)
    else:
        label, per_param = optimizer_state(hp.optim, w)
        parts["weights (master)"] = p * w / shard
        parts["gradients"] = p * w / shard
        parts[label] = p * per_param / shard
    if strategy == "ddp" and gpus > 1:
        # DDP's reducer all-reduces flat buckets holding a copy of every gradient (measured on
        # CPU ranks: bench/trainer_memory.py).
        parts["DDP gradient buckets"] = trainable * w
    if hp.cpu_offload and strategy != "ddp":
        for key in list(parts):
            parts[key] = 0.0  # the shards live in host memory
    has_reference = (
        needs_reference(hp.loss_type)  # reference-free losses (simpo) load none
        and not hp.precompute_ref_log_probs
        and not (lora is not None and same_reference)
    )
    if has_reference:
        parts["reference"] = p * c / shard
    if strategy != "ddp":
        # The unit being computed and the prefetched next one, gathered in compute dtype, and
        # one unit's unsharded gradients before their reduce-scatter. The reference is sharded
        # per decoder layer too (its forward gathers a layer at a time, before the policy's),
        # so its gathers never add to these.
        unit = max(shape.layer_parameters, shape.embedding_parameters // 2)
        parts["gathered layers"] = 3 * unit * c
    parts["activations"] = activation_bytes(shape, hp, checkpointing=checkpointing)
    return parts


def trainer_host_memory(
    shape: ModelShape,
    hp: DPOHyperparameters,
    *,
    strategy: Strategy,
    gpus: int,
    lora: LoraSettings | None = None,
    same_reference: bool = False,
    device: str = "cuda",
    rank: int = 0,
    max_shard_bytes: float = DEFAULT_MAX_SHARD_BYTES,
    publish_bytes: int = 2,
) -> dict[str, dict[str, float]]:
    """Host bytes of one training rank by phase ("load", "train", "save"), by part.

    Rank 0 reads the weights and writes the published ones; under FSDP the other ranks build
    the models empty (no host copy) and gather one tensor at a time at the save; under DDP every
    rank loads everything. On `device` "cpu" the GPU parts (`trainer_memory`) live in host
    memory too: that is what bench/trainer_memory.py measures. `publish_bytes`: the published
    dtype's (the policy checkpoint's: bf16 for Mistral).
    """
    p, w = shape.parameters, _dtype_bytes(hp.dtype)
    on_cpu = device == "cpu"
    c = 2 if hp.bf16 is not False and not on_cpu else w
    runtime = RUNTIME_HOST_BYTES + (0.0 if on_cpu else CUDA_RUNTIME_HOST_BYTES)
    # Precomputed reference log-probs still need the reference at load (it is freed after).
    loads_reference = not (lora is not None and same_reference)
    reads = rank == 0 or strategy == "ddp"
    shard = gpus if strategy != "ddp" else 1
    device_parts = trainer_memory(
        shape,
        hp,
        strategy=strategy,
        gpus=gpus,
        lora=lora,
        same_reference=same_reference,
    )
    # What stays in host memory through training: everything on CPU; offloaded shards on a GPU.
    resident: dict[str, float] = {}
    if on_cpu:
        resident = dict(device_parts)
    elif hp.cpu_offload and strategy != "ddp":
        state = optimizer_state(hp.optim, w)[1]
        resident["offloaded shards (weights, gradients, optimizer)"] = p * (2 * w + state) / shard
    load: dict[str, float] = {"runtime": runtime}
    if reads:
        load["policy (whole, read by this rank)"] = p * w
        if loads_reference:
            load["reference (whole)"] = p * c
    if on_cpu and loads_reference and strategy != "ddp":
        load["reference shard (being filled)"] = p * c / shard
    largest = max(shape.vocab_size * shape.hidden_size, shape.hidden_size * shape.intermediate_size)
    save = {"runtime": runtime, **{k: v for k, v in resident.items() if k != "activations"}}
    if rank == 0:
        # One safetensors file's worth of published tensors, plus the one being gathered.
        save["published file being written"] = min(max_shard_bytes, p * publish_bytes)
    save["tensor being gathered"] = largest * w
    return {"load": load, "train": {"runtime": runtime, **resident}, "save": save}


def trainer_disk(
    shape: ModelShape,
    hp: DPOHyperparameters,
    *,
    save_total_limit: int = DEFAULT_SAVE_TOTAL_LIMIT,
    publish_bytes: int = 2,
) -> dict[str, float]:
    """Disk bytes of one iteration's training at its peak, by part.

    Resume checkpoints (sharded, torch.distributed.checkpoint: master weights + the optimizer
    state, AdamW's two moments by default) are kept `save_total_limit` at a time, and deleted once the iteration's weights are
    published; the published weights stay (the next iteration's policy and reference).
    """
    p, w = shape.parameters, _dtype_bytes(hp.dtype)
    return {
        "published weights": p * publish_bytes,
        f"resume checkpoints (x{save_total_limit}, until published)": save_total_limit
        * p
        * (w + optimizer_state(hp.optim, w)[1]),
    }


def generator_memory(shape: ModelShape, cfg: RunConfig) -> dict[str, float]:
    """One generator replica: bf16 weights and the KV cache of its in-flight sequences."""
    context = min(shape.max_position_embeddings, DEFAULT_PROMPT_TOKENS + cfg.sampling.max_tokens)
    sequences = cfg.services.concurrency * cfg.samples_per_prompt
    return {
        "weights (bf16)": shape.parameters * 2.0,
        f"KV cache ({sequences} seqs x {context} tokens)": float(
            sequences * context * shape.kv_bytes_per_token()
        ),
    }


def ranker_memory(max_batch_tokens: int) -> dict[str, float]:
    """PairRM in float32 and one forward pass of `max_batch_tokens` padded tokens."""
    rows = max(max_batch_tokens // PAIRRM_SEQUENCE, 1)
    tokens = rows * PAIRRM_SEQUENCE
    h, heads = PAIRRM.hidden_size, PAIRRM.num_attention_heads
    # DeBERTa's disentangled attention materialises scores: rows x heads x T x T, ~3 live.
    attention = 3 * rows * heads * PAIRRM_SEQUENCE * PAIRRM_SEQUENCE * 4
    hidden = tokens * (4 * h + PAIRRM.intermediate_size) * 4
    return {"weights (fp32)": PAIRRM.parameters * 4.0, "largest batch": float(attention + hidden)}


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"


def _trainer_stage(
    shape: ModelShape,
    hp: DPOHyperparameters,
    *,
    strategy: Strategy,
    gpus: int,
    lora: LoraSettings | None,
    same_reference: bool,
    budget: float,
    machines: int = 1,
) -> StageEstimate:
    parts = trainer_memory(
        shape,
        hp,
        strategy=strategy,
        gpus=gpus,
        lora=lora,
        same_reference=same_reference,
    )
    where = f"{machines} machines x {gpus // machines} GPUs" if machines > 1 else f"{gpus} GPUs"
    stage = StageEstimate(f"trainer ({strategy}, {where})", parts, budget)
    if stage.fits:
        return stage
    # Try each knob alone; name those that would make it fit, with their estimate.
    tries: list[tuple[str, DPOHyperparameters, Strategy, LoraSettings | None]] = []
    if strategy == "ddp":
        tries.append(("strategy: fsdp", hp, "fsdp", lora))
    if not hp.precompute_ref_log_probs and needs_reference(hp.loss_type):
        tries.append(
            ("precompute_ref_log_probs: true", replace_hp(hp, precompute_ref_log_probs=True),
             strategy, lora)
        )  # fmt: skip
    if strategy != "ddp" and not hp.cpu_offload:
        tries.append(("cpu_offload: true", replace_hp(hp, cpu_offload=True), strategy, lora))
    if hp.gradient_checkpointing is False:
        tries.append(
            ("gradient_checkpointing: true", replace_hp(hp, gradient_checkpointing=True),
             strategy, lora)
        )  # fmt: skip
    if hp.per_device_train_batch_size > 1:
        smaller = replace_hp(hp, per_device_train_batch_size=hp.per_device_train_batch_size // 2)
        tries.append((f"per_device_train_batch_size: {smaller.per_device_train_batch_size}",
                      smaller, strategy, lora))  # fmt: skip
    if lora is None:
        tries.append(("lora: {r: 16}", hp, strategy, LoraSettings.model_validate({})))
    for label, h2, s2, l2 in tries:
        total = sum(
            trainer_memory(shape, h2, strategy=s2, gpus=gpus, lora=l2, same_reference=same_reference).values()
        )  # fmt: skip
        if total <= budget:
            stage.knobs.append(f"{label} (-> {_gib(total)})")
    if strategy != "ddp":
        for more in (gpus * 2, gpus * 4):
            total = sum(trainer_memory(shape, hp, strategy=strategy, gpus=more, lora=lora,
                                       same_reference=same_reference).values())  # fmt: skip
            if total <= budget:
                stage.knobs.append(f"--gpus {more} (-> {_gib(total)})")
                break
    return stage


def replace_hp(hp: DPOHyperparameters, **changes: Any) -> DPOHyperparameters:
    """`hp` with `changes` (validated, like a run config edit)."""
    return DPOHyperparameters.model_validate({**hp.model_dump(), **changes})


def plan_run(
    cfg: RunConfig,
    *,
    gpus: int,
    gpu_memory_gib: float,
    shape: ModelShape | None = None,
    shape_source: str = "",
    strategy: Strategy | None = None,
    ranker_max_batch_tokens: int = 16384,
    host_memory_gib: float | None = None,
) -> Plan:
    """Estimate every stage of `cfg` on `gpus` GPUs of `gpu_memory_gib` GiB each.

    `gpus` are one machine's: a job over `dpo.num_machines` machines trains on that many times
    more ranks (shards and the accumulation follow the whole world; host memory stays one
    machine's ranks). `host_memory_gib`: the training machine's host memory; a plan whose
    training ranks need more (at load, in training or at the save) is refused.
    """
    if shape is None:
        shape, shape_source = load_shape(cfg.base_model)
    hp = cfg.dpo
    if hp.bf16 == "auto" or hp.gradient_checkpointing == "auto":
        # "auto" is on with CUDA: what the trainer resolves on these GPUs.
        hp = replace_hp(
            hp,
            bf16=True if hp.bf16 == "auto" else hp.bf16,
            gradient_checkpointing=True
            if hp.gradient_checkpointing == "auto"
            else hp.gradient_checkpointing,
        )
    chosen: Strategy = strategy or hp.strategy or DEFAULT_STRATEGY
    world = gpus * hp.num_machines
    if world == 1:
        chosen = "ddp" if not hp.cpu_offload else chosen  # one rank: nothing to shard over
    budget = gpu_memory_gib * GIB * HEADROOM
    problems: list[str] = []
    same_reference = cfg.reference == "previous"
    stages = [
        StageEstimate(
            "generator (per replica)",
            generator_memory(shape, cfg),
            gpu_memory_gib * GIB * VLLM_GPU_MEMORY_UTILIZATION,
            note="vLLM takes gpu_memory_utilization of the GPU and gives the rest to KV cache",
        ),
        StageEstimate(
            "ranker (PairRM)",
            ranker_memory(ranker_max_batch_tokens),
            budget,
            note=f"--max-batch-tokens {ranker_max_batch_tokens}",
        ),
        _trainer_stage(
            shape,
            hp,
            strategy=chosen,
            gpus=world,
            lora=cfg.lora,
            same_reference=same_reference,
            budget=budget,
            machines=hp.num_machines,
        ),
    ]
    for stage in stages:
        if stage.fits:
            continue
        hint = "; turn one of: " + ", ".join(stage.knobs) if stage.knobs else ""
        if stage.stage.startswith("generator"):
            hint = "; lower sampling.max_tokens or services.concurrency, or use bigger GPUs"
        elif stage.stage.startswith("ranker"):
            hint = "; lower the ranker's --max-batch-tokens"
        elif not stage.knobs:
            hint = "; no single knob fits it: combine them, or use more or bigger GPUs"
        problems.append(
            f"{stage.stage} needs {_gib(stage.total)} per GPU, more than {_gib(stage.budget)} "
            f"of {gpu_memory_gib:g} GiB{hint}"
        )
    accumulation: int | None
    try:
        accumulation = hp.gradient_accumulation_for(world)
    except ValueError as exc:
        accumulation = None
        problems.append(f"dpo.{exc}")
    world_batch = world * hp.per_device_train_batch_size
    host = {
        rank: trainer_host_memory(
            shape,
            hp,
            strategy=chosen,
            gpus=world,
            lora=cfg.lora,
            same_reference=same_reference,
            rank=rank,
        )
        for rank in (0, 1)
    }
    plan = Plan(
        gpus=gpus,
        gpu_memory_gib=gpu_memory_gib,
        strategy=chosen,
        stages=stages,
        gradient_accumulation_steps=accumulation,
        global_batch_size=hp.global_batch_size or world_batch * hp.gradient_accumulation_steps,
        shape_source=shape_source,
        parameters=shape.parameters,
        problems=problems,
        trainer_host=host[0],
        trainer_host_other_ranks=host[1],
        trainer_disk=trainer_disk(shape, hp),
        host_memory_gib=host_memory_gib,
        machines=hp.num_machines,
    )
    if host_memory_gib is not None:
        need, limit = plan.trainer_machine_host_peak, host_memory_gib * GIB * HEADROOM
        if need > limit:
            worst = max(plan.trainer_host, key=lambda k: sum(plan.trainer_host[k].values()))
            problems.append(
                f"the trainer's {gpus} ranks need {_gib(need)} of host memory (rank 0 "
                f"{_gib(plan.trainer_host_peak)} at {worst}), more than {_gib(limit)} of "
                f"{host_memory_gib:g} GiB; give the trainer machine more memory, or train on fewer "
                "ranks per machine (PAIRLOOP_TRAINER_NUM_PROCESSES, NUM_MACHINES)"
            )
    return plan

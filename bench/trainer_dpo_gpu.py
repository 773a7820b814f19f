"""DPO on the GPUs, sharded vs DDP, held against `pairloop plan`: peak memory and samples/s.

    python -m bench.trainer_dpo_gpu                    # CUDA host: the three variants below
    python -m bench.trainer_dpo_gpu --variants 1b:ddp,1b:fsdp --steps 3
    python -m bench.trainer_dpo_gpu --gpus 0 --variants 7b:fsdp --steps 1   # every visible GPU
    python -m bench.trainer_dpo_gpu --device cpu --variants tiny:ddp,tiny:fsdp --batch-size 2 \\
        --grad-accum 1 --prompt-tokens 32 --response-tokens 48 --tag smoke   # harness, no GPU

Variants are SHAPE:STRATEGY[+precompute][+offload]; the default is the GPU check of issue 11:
- `1b:ddp` and `1b:fsdp`: a TinyLlama-1.1B-shaped full DPO step, one process (DDP's memory: the
  whole model on the GPU) vs FSDP2 full shard over one rank (same bytes, FSDP's machinery),
- `7b:fsdp+precompute`: a Mistral-7B-shaped step on one GPU with precomputed reference
  log-probs (float32 master weights + AdamW: ~108 GiB by count; fits a 141 GB H200, not 80 GB;
  `+offload` moves the shards to host memory instead).

`--gpus N` runs each variant on N ranks (0: every visible GPU), the recipe's way: the plan is made
for N GPUs, each rank's peak GPU memory and peak host RSS are held against the plan's GPU
estimate and its host estimate (rank 0 reads and writes the weights; the others build empty
models), and the global batch is N x batch x accumulation.

Every variant is a whole training job through production code (`run_train_job` ->
`accelerate launch` with the strategy's config file -> `launch_entry` -> DPOTrainer) on a random
model saved in bfloat16 (as Mistral ships; trained in float32 master weights with bf16 compute,
gradient checkpointing), with Zephyr's settings otherwise (beta 0.01, lr 5e-7, cosine, warmup
0.1, adamw_torch) and synthetic pairs of `--prompt-tokens` + `--response-tokens`. A step's time
is the gap between consecutive per-step progress reports (first step excluded); peak memory is
the rank's `torch.cuda.max_memory_allocated` (on CPU: peak RSS). Each is printed beside
`orchestrator.plan.trainer_memory` for the same shape, batch and sequence length.
Writes bench/results/trainer_dpo_gpu[_TAG].json. Needs ~30 GB of free disk for the 7B checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_WORDS = [
    "the",
    "sea",
    "is",
    "blue",
    "because",
    "light",
    "scatters",
    "and",
    "rainbows",
    "form",
    "after",
    "rain",
]

# Llama-style shapes: TinyLlama-1.1B and Mistral-7B-v0.1/v0.2 (the recipe's base model).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"arch": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 1024},
    "1b": {"arch": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    "7b": {"arch": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "vocab_size": 32000},
}  # fmt: skip
DEFAULT_VARIANTS = "1b:ddp,1b:fsdp,7b:fsdp+precompute"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--variants", default=DEFAULT_VARIANTS, help="SHAPE:STRATEGY[+precompute][+offload],..."
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--gpus", type=int, default=1, help="ranks per variant (0: all visible GPUs)")
    p.add_argument("--batch-size", type=int, default=8, help="per-device batch (Zephyr: 8)")
    p.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation (Zephyr: 2)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after 1 warm-up)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--response-tokens", type=int, default=384)
    p.add_argument("--work", type=Path, help="model store to use (default: a temp dir, removed)")
    p.add_argument("--tag", default="", help="suffix for the results file")
    return p  # fmt: skip


def _text(tokenizer: Any, seed: int, tokens: int) -> str:
    out: list[str] = []
    i = seed
    while len(tokenizer(" ".join(out))["input_ids"]) < tokens:
        out.extend(_WORDS[(i + k) % len(_WORDS)] for k in range(16))
        i += 5
    return " ".join(out)


def build_store(store: Path, name: str, args: argparse.Namespace) -> Path:
    """A random `name`-shaped model saved in bf16 with a tiny tokenizer, and synthetic pairs."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    from pairloop.preference_data import make_preference_row, write_preference_split
    from pairloop_local.tiny_models import CHAT_TEMPLATES, build_tokenizer

    out = store / name
    shape = dict(SHAPES[name])
    arch = shape.pop("arch")
    tokenizer = build_tokenizer(vocab_size=1024, chat_template=CHAT_TEMPLATES[arch])
    if not (out / "config.json").is_file():
        config = (MistralConfig if arch == "mistral" else LlamaConfig)(
            **shape,
            head_dim=shape["hidden_size"] // shape["num_attention_heads"],
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        # Built on the device in bf16 (fast), saved in bf16: the policy dtype the job publishes.
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(out, max_shard_size="5GB")
        tokenizer.save_pretrained(out)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    prompt = _text(tokenizer, 0, args.prompt_tokens)
    chosen, rejected = (
        _text(tokenizer, 1, args.response_tokens),
        _text(tokenizer, 2, args.response_tokens),
    )
    pairs = args.batch_size * args.grad_accum * (args.steps + 1)
    rows = [
        make_preference_row(prompt_id=f"p{i}", prompt=f"{i} {prompt}", responses=[chosen, rejected],
                            scores=[1.0, 0.0], chosen_index=0, rejected_index=1)
        for i in range(pairs)
    ]  # fmt: skip
    write_preference_split(store / f"data-{name}", "train_iteration_1", rows)
    return out


def _hyperparameters(args: argparse.Namespace, strategy: str, flags: set[str]) -> dict[str, Any]:
    # Room for the chat template's tokens around prompt and response.
    max_length = args.prompt_tokens + args.response_tokens + 32
    return {
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "max_steps": args.steps + 1,
        "save_steps": 10_000,  # the bench measures steps, not checkpoint I/O
        "max_length": max_length,
        "max_prompt_length": args.prompt_tokens + 16,
        "strategy": strategy,
        "precompute_ref_log_probs": "precompute" in flags,
        "cpu_offload": "offload" in flags,
        "dtype": "float32",  # master weights
    }


def run_variant(store: Path, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    from orchestrator.plan import GIB, ModelShape, replace_hp, trainer_host_memory, trainer_memory
    from pairloop.jobs import DPOHyperparameters, Strategy, TrainJob, TrainProgress
    from services.trainer.runner import run_train_job
    from services.trainer.settings import TrainerSettings

    name, _, rest = variant.partition(":")
    strategy, *extra = rest.split("+")
    flags = set(extra)
    build_store(store, name, args)
    hp = _hyperparameters(args, strategy, flags)
    job = TrainJob(
        run_id=f"gpu-{name}-{strategy}-{'-'.join(sorted(flags)) or 'plain'}-{int(time.time())}",
        iteration=1,
        policy_path=name,
        reference_path=name,
        dataset_path=f"data-{name}",
        output_path=f"out/{variant.replace(':', '-').replace('+', '-')}",
        hyperparameters=hp,
    )
    settings = TrainerSettings(
        model_store_root=store,
        redis_url="redis://unused:1/0",
        device=args.device,
        launcher="accelerate",
        num_processes=args.gpus,
        cpu_threads=1 if args.device == "cpu" else None,
    )
    stamps: list[float] = []
    seen = [0]

    def report(progress: TrainProgress) -> None:
        if progress.phase == "training" and progress.loss is not None and progress.step > seen[0]:
            seen[0] = progress.step
            stamps.append(time.perf_counter())

    result = run_train_job(job, settings, report=report)
    shutil.rmtree(store / job.output_path, ignore_errors=True)
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    step = statistics.median(steps) if steps else float("nan")
    rank = result.ranks[0]
    device_peaks = [r.peak_device_bytes or 0 for r in result.ranks]
    host_peaks = [r.peak_rss_bytes for r in result.ranks]
    measured = max(device_peaks) if args.device == "cuda" else max(host_peaks)
    shape = ModelShape(**{k: v for k, v in SHAPES[name].items() if k != "arch"})
    on = {"bf16": args.device == "cuda", "gradient_checkpointing": args.device == "cuda"}
    plan_hp = replace_hp(DPOHyperparameters.model_validate(hp), **on)
    gpus = len(result.ranks)
    planned: Strategy = "ddp" if strategy == "ddp" else "fsdp"
    estimate = trainer_memory(shape, plan_hp, strategy=planned, gpus=gpus)
    host = [
        max(
            sum(parts.values())
            for parts in trainer_host_memory(
                shape, plan_hp, strategy=planned, gpus=gpus, device=args.device, rank=r
            ).values()
        )
        for r in range(gpus)
    ]
    pairs = args.batch_size * args.grad_accum * gpus
    return {
        "gpus": gpus,
        "peak_device_gib_per_rank": [b / GIB for b in device_peaks],
        "peak_host_rss_gib_per_rank": [b / GIB for b in host_peaks],
        "plan_host_gib_per_rank": [b / GIB for b in host],
        "loaded_numel_per_rank": [r.loaded_numel for r in result.ranks],
        "reference_fsdp_units": rank.reference_fsdp_units,
        "parameters": rank.policy_numel,
        "pairs_per_step": pairs,
        "step_seconds": steps,
        "median_step_seconds": step,
        "samples_per_second": pairs / step,
        "peak_memory_gib": (measured or 0) / GIB,
        "plan_estimate_gib": sum(estimate.values()) / GIB,
        "plan_parts_gib": {k: v / GIB for k, v in estimate.items()},
        "timings": result.timings,
        "strategy": result.strategy,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU host, or pass --device cpu --variants tiny:ddp")
        return 2
    if args.gpus == 0:
        args.gpus = torch.cuda.device_count() if args.device == "cuda" else 2
    report: dict[str, Any] = {
        "bench": "trainer_dpo_gpu",
        "machine": {
            "platform": platform.platform(),
            "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
            "torch": torch.__version__,
        },
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "variants": {},
    }
    store = args.work or Path(tempfile.mkdtemp(prefix="dpo-gpu-bench-"))
    memory = "peak GPU" if args.device == "cuda" else "peak RSS"
    try:
        for variant in args.variants.split(","):
            try:
                result = run_variant(store, variant, args)
            except Exception as exc:  # an OOM in the ranks arrives as the job's error
                result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            report["variants"][variant] = result
            if "error" in result:
                print(f"{variant}: {result['error'][:300]}")
                continue
            print(
                f"{variant}: {result['parameters'] / 1e9:.2f}B params, step "
                f"{result['median_step_seconds']:.2f}s for {result['pairs_per_step']} pairs = "
                f"{result['samples_per_second']:.2f} samples/s, {memory} "
                f"{result['peak_memory_gib']:.1f} GiB vs plan {result['plan_estimate_gib']:.1f} GiB"
                f" on each of {result['gpus']} ranks; host RSS per rank "
                f"{[round(x, 1) for x in result['peak_host_rss_gib_per_rank']]} GiB vs plan "
                f"{[round(x, 1) for x in result['plan_host_gib_per_rank']]}"
            )
    finally:
        if args.work is None:
            shutil.rmtree(store, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "trainer_dpo_gpu" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {RESULTS / name}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

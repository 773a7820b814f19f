"""DPO on a GPU with the Zephyr recipe: samples/s, peak memory and projected hours for 20,000 pairs,
for random 1B- and 7B-shaped models (nothing is downloaded).

    python -m bench.trainer_dpo_gpu                         # CUDA host: 1b, then 7b if it fits
    python -m bench.trainer_dpo_gpu --shapes 1b --steps 4
    python -m bench.trainer_dpo_gpu --shapes tiny --device cpu --batch-size 2 --grad-accum 1 \\
        --prompt-tokens 32 --response-tokens 48 --tag smoke   # check the harness without a GPU

Same trainer code as the worker (`services.trainer.dpo`: its DPOConfig builder and DPOTrainer
subclass) with the Zephyr settings: beta 0.01, lr 5e-7, per-device batch 8 x grad-accum 2,
max_length 1024, max_prompt_length 512, cosine, warmup 0.1, adamw_torch, bf16, gradient
checkpointing, and an explicit reference model. The models are random, built in memory in bf16
on the device (a 7B checkpoint on disk would cost ~15 GB per copy; weights do not change speed).
Pairs are synthetic with fixed lengths (`--prompt-tokens`, `--response-tokens`, UltraFeedback-like
by default: 256 + 384). A step's time is the gap between consecutive per-step reports, the first
step excluded as warm-up; peak memory is `torch.cuda.max_memory_allocated`. Projected hours for
20,000 pairs are for one GPU; DDP over k GPUs divides them by up to k (Zephyr used 8 GPUs and
DeepSpeed ZeRO-3; a 7B full fine-tune with an AdamW state fits on one 141 GB H200 in pure bf16).
Writes bench/results/trainer_dpo_gpu[_TAG].json.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PROJECT_PAIRS = 20_000
_WORDS = "the sea is blue because light scatters and rainbows form after rain"

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


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="1b,7b", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch-size", type=int, default=8, help="per-device batch (Zephyr: 8)")
    p.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation (Zephyr: 2)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after 1 warm-up)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--response-tokens", type=int, default=384)
    p.add_argument("--tag", default="", help="suffix for the results file")
    return p


def _pairs(tokenizer: Any, n: int, prompt_tokens: int, response_tokens: int) -> list[dict]:
    """Synthetic conversational pairs whose rendered lengths are close to the targets."""
    words = _WORDS.split()

    def text(seed: int, tokens: int) -> str:
        out: list[str] = []
        i = seed
        while len(tokenizer(" ".join(out))["input_ids"]) < tokens:
            out.extend(words[(i + k) % len(words)] for k in range(16))
            i += 5
        return " ".join(out)

    prompt = text(0, prompt_tokens)
    chosen, rejected = text(1, response_tokens), text(2, response_tokens)
    return [
        {
            "prompt": [{"role": "user", "content": f"{i} {prompt}"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        for i in range(n)
    ]


def run_shape(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig
    from transformers.trainer_callback import PrinterCallback

    from pairloop.jobs import TrainJob, TrainProgress
    from pairloop_local.tiny_models import CHAT_TEMPLATES, build_tokenizer
    from services.trainer.dpo import dpo_config, dpo_trainer_class, progress_callback
    from services.trainer.spec import TrainingSpec

    shape = dict(SHAPES[name])
    arch = shape.pop("arch")
    tokenizer = build_tokenizer(vocab_size=1024, chat_template=CHAT_TEMPLATES[arch])
    config_cls = MistralConfig if arch == "mistral" else LlamaConfig
    config = config_cls(
        **shape,
        head_dim=shape["hidden_size"] // shape["num_attention_heads"],
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        policy = AutoModelForCausalLM.from_config(config, dtype=dtype)
        reference = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in policy.parameters())
    pairs_per_step = args.batch_size * args.grad_accum
    total_steps = args.steps + 1
    dataset = Dataset.from_list(
        _pairs(tokenizer, pairs_per_step * total_steps, args.prompt_tokens, args.response_tokens)
    )
    hp = {
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "max_steps": total_steps,
        "warmup_ratio": 0.1,
        "logging_steps": 1,
    }  # everything else: the Zephyr defaults of DPOHyperparameters
    work = Path(tempfile.mkdtemp(prefix="dpo-gpu-bench-"))
    job = TrainJob(
        run_id="bench",
        iteration=1,
        policy_path="policy",
        reference_path="policy",
        dataset_path="data",
        output_path="out",
        hyperparameters=hp,
    )
    spec = TrainingSpec(
        job=job,
        policy_path="policy",
        reference_path="policy",
        dataset_path="data",
        dataset_cache=str(work / "cache"),
        checkpoints_dir=str(work / "checkpoints"),
        staging_dir=str(work / "staging"),
        device=args.device,
    )
    stamps: list[float] = []
    seen = [0]

    def report(progress: TrainProgress) -> None:
        # One stamp per new step: the report after a checkpoint save repeats the step.
        if progress.phase == "training" and progress.loss is not None and progress.step > seen[0]:
            seen[0] = progress.step
            if args.device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    config_args = dpo_config(spec)
    config_args.save_strategy = "no"  # the bench measures steps, not checkpoint I/O
    trainer_cls = dpo_trainer_class()
    trainer_cls.max_prompt_length = job.hyperparameters.max_prompt_length
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = trainer_cls(
        model=policy,
        ref_model=reference,
        args=config_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[progress_callback(report, 0)],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    step = statistics.median(steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    samples_per_second = pairs_per_step / step
    del trainer, policy, reference
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {
        "parameters": params,
        "pairs_per_step": pairs_per_step,
        "step_seconds": steps,
        "median_step_seconds": step,
        "samples_per_second": samples_per_second,
        "peak_memory_gib": peak,
        "projected_hours_20k_pairs_one_gpu": PROJECT_PAIRS / samples_per_second / 3600,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU host, or pass --device cpu --shapes tiny")
        return 2
    report: dict[str, Any] = {
        "bench": "trainer_dpo_gpu",
        "machine": {
            "platform": platform.platform(),
            "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
            "torch": torch.__version__,
        },
        "config": vars(args),
        "shapes": {},
    }
    for name in args.shapes.split(","):
        try:
            result = run_shape(name, args)
        except torch.OutOfMemoryError as exc:
            result = {"error": f"out of memory: {exc}"}
            torch.cuda.empty_cache()
        report["shapes"][name] = result
        if "error" in result:
            print(f"{name}: {result['error'][:200]}")
            continue
        peak = result["peak_memory_gib"]
        print(
            f"{name}: {result['parameters'] / 1e9:.2f}B params, step "
            f"{result['median_step_seconds']:.2f}s for {result['pairs_per_step']} pairs = "
            f"{result['samples_per_second']:.2f} samples/s, peak "
            f"{'n/a' if peak is None else f'{peak:.1f} GiB'}, 20k pairs in "
            f"{result['projected_hours_20k_pairs_one_gpu']:.2f} h on one device"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "trainer_dpo_gpu" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {RESULTS / name}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Time-shared generator on GPUs: release/wake time and memory freed at a 7B shape; generation
throughput with 1 GPU vs all of them (data-parallel engines). Needs CUDA, vLLM and ~35 GB of disk.

    python -m bench.generator_sleep_gpu                     # every visible GPU, 7B shape
    python -m bench.generator_sleep_gpu --gpus 2 --shape 1b --prompts 64 --tokens 128   # quicker

Two random checkpoints of a Mistral-7B shape (bf16, weight seeds 0 and 1, a tiny tokenizer) in
a model store. For 1 GPU and then for `--gpus` GPUs, the real service (`python -m
services.generator --data-parallel-size N`, CUDA_VISIBLE_DEVICES the first N GPUs) is started
and measured:

    throughput    generated tokens/s over `--prompts` prompts x 5 samples of exactly `--tokens`
                  tokens (min_tokens = max_tokens), sent as concurrent /v1/batch/chat calls
    release       POST /admin/release wall time (vLLM sleep level 2) and the GPU memory it
                  frees (nvidia-smi memory.used summed over the service's GPUs, before/after)
    wake          POST /admin/wake onto the other checkpoint (wake weights -> reload_weights ->
                  wake KV cache -> reset prefix cache) wall time, memory after, and the first
                  greedy answer's version label
    during        what a request gets while released (expected: 503 with Retry-After)

Prints a table and writes bench/results/generator_sleep_gpu.json. Not run in CI (no GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench._generator_service import (
    ADMIN_TOKEN,
    RESULTS,
    make_console,
    rich_table,
    service_env,
    wait_ready,
)
from pairloop.atomic import atomic_write_json
from pairloop_local.processes import ManagedProcess, free_port

SHAPES: dict[str, dict[str, Any]] = {
    "7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
}  # fmt: skip
HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpus", type=int, default=0, help="GPUs of the 'all' run (0: every one)")
    p.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    p.add_argument("--prompts", type=int, default=256, help="prompts per throughput run")
    p.add_argument("--tokens", type=int, default=256, help="generated tokens per sample")
    p.add_argument("--samples", type=int, default=5, help="samples per prompt (the recipe: 5)")
    p.add_argument("--batch", type=int, default=32, help="prompts per /v1/batch/chat call")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.75)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (faster start)")
    p.add_argument("--work", type=Path, help="model store to use (default: a temp dir, removed)")
    return p


def gpu_count() -> int:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return len(out.split())


def memory_used(gpus: list[int]) -> int:
    """Bytes in use on `gpus`, all processes (nvidia-smi: the sleeping engine included)."""
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    used = {int(i): int(mib) << 20 for i, mib in (line.split(",") for line in out.splitlines())}
    return sum(used[g] for g in gpus)


def build_checkpoint(out: Path, shape: str, seed: int) -> Path:
    """A random `shape` model saved in bf16 (as Mistral ships) with a tiny chat tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from pairloop_local.tiny_models import CHAT_TEMPLATES, build_tokenizer

    if (out / "config.json").is_file():
        return out
    tokenizer = build_tokenizer(vocab_size=1024, chat_template=CHAT_TEMPLATES["mistral"])
    dims = SHAPES[shape]
    config = MistralConfig(
        **dims,
        head_dim=dims["hidden_size"] // dims["num_attention_heads"],
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


async def throughput(url: str, args: argparse.Namespace) -> dict[str, float]:
    convs = [[{"role": "user", "content": f"Question {i}: tell me about the sea."}]
             for i in range(args.prompts)]  # fmt: skip
    body = {"n": args.samples, "max_tokens": args.tokens, "min_tokens": args.tokens,
            "temperature": 1.0, "seed": 0}  # fmt: skip
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        # Warm-up: the first requests pay for lazy initialisation, not throughput.
        await client.post("/v1/batch/chat", json={**body, "conversations": convs[:2]})
        start = time.perf_counter()
        replies = await asyncio.gather(*[
            client.post("/v1/batch/chat", json={**body, "conversations": convs[i : i + args.batch]})
            for i in range(0, len(convs), args.batch)
        ])  # fmt: skip
        seconds = time.perf_counter() - start
    tokens = 0
    for r in replies:
        r.raise_for_status()
        tokens += sum(sum(res["completion_tokens"]) for res in r.json()["results"])
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def release_and_wake(url: str, gpus: list[int], other: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"memory_before": memory_used(gpus)}
    with httpx.Client(base_url=url, timeout=3600, headers=HEADERS) as client:
        start = time.perf_counter()
        r = client.post("/admin/release", json={})
        r.raise_for_status()
        out["release_s"] = time.perf_counter() - start
        out["release_how"] = r.json()["how"]
        out["memory_released"] = memory_used(gpus)
        during = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        out["during_release"] = {
            "status": during.status_code,
            "retry_after": during.headers.get("Retry-After"),
        }
        start = time.perf_counter()
        r = client.post("/admin/wake", json={"path": str(other), "version": "woken"})
        r.raise_for_status()
        out["wake_s"] = time.perf_counter() - start
        out["memory_woken"] = memory_used(gpus)
        first = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        )
        first.raise_for_status()
        out["first_answer_version"] = first.json()["weight_version"]
    out["freed_bytes"] = out["memory_before"] - out["memory_released"]
    return out


def run_one(store: Path, model: Path, other: Path, n: int, args: argparse.Namespace) -> dict:
    port = free_port()
    argv = [sys.executable, "-m", "services.generator", "--port", str(port),
            "--model", str(model), "--model-root", str(store), "--admin-token", ADMIN_TOKEN,
            "--served-model-name", "bench", "--dtype", "bfloat16", "--kv-cache-bytes", "0",
            "--max-model-len", "2048", "--data-parallel-size", str(n),
            "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--max-n", str(args.samples), "--max-batch-prompts", str(args.batch),
            "--enforce-eager" if args.eager else "--no-enforce-eager",
            "--no-access-log", "--log-level", "WARNING"]  # fmt: skip
    env = service_env(store / f"scratch-{n}", 0)
    gpus = list(range(n))
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    url = f"http://127.0.0.1:{port}"
    proc = ManagedProcess(f"generator-dp{n}", argv, log_path=store / f"dp{n}.log", env=env)
    started = time.perf_counter()
    proc.start()
    try:
        wait_ready(proc, url, timeout=1800)
        result: dict[str, Any] = {"gpus": n, "start_s": time.perf_counter() - started}
        result["throughput"] = asyncio.run(throughput(url, args))
        result["release_wake"] = release_and_wake(url, gpus, other)
        return result
    finally:
        proc.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    console = make_console()
    every = args.gpus or gpu_count()
    with tempfile.TemporaryDirectory(prefix="sleep-bench-") as tmp:
        store = args.work or Path(tmp)
        a = build_checkpoint(store / f"{args.shape}-seed0", args.shape, 0)
        b = build_checkpoint(store / f"{args.shape}-seed1", args.shape, 1)
        runs = [run_one(store, a, b, n, args) for n in sorted({1, every})]
    rows = [
        [
            str(r["gpus"]),
            f"{r['throughput']['tokens_per_s']:.0f}",
            f"{r['release_wake']['release_s']:.2f}",
            f"{r['release_wake']['freed_bytes'] / (1 << 30):.1f}",
            f"{r['release_wake']['wake_s']:.2f}",
            str(r["release_wake"]["during_release"]["status"]),
            f"{r['start_s']:.0f}",
        ]
        for r in runs
    ]
    console.print(rich_table(
        f"generator release/wake and throughput ({args.shape}, {args.tokens} tokens x "
        f"{args.samples} samples x {args.prompts} prompts)",
        ["GPUs", "tokens/s", "release s", "freed GiB", "wake s", "during", "cold start s"],
        rows,
    ))  # fmt: skip
    if len(runs) == 2:
        speedup = runs[1]["throughput"]["tokens_per_s"] / runs[0]["throughput"]["tokens_per_s"]
        console.print(f"throughput {every} GPUs / 1 GPU: {speedup:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(
        RESULTS / "generator_sleep_gpu.json",
        {"args": {k: str(v) for k, v in vars(args).items()}, "host": platform.node(), "runs": runs},
    )
    return 0 if all(r["release_wake"]["first_answer_version"] == "woken" for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Weight I/O: write a sharded safetensors checkpoint of a real model's shapes, then read it back.

    python -m bench.weights_io --shape 100m                      # CPU, ~0.16 GB
    python -m bench.weights_io --shape 1b --workdir /tmp/wio     # CPU, ~2.2 GB of disk
    python -m bench.weights_io --shape 7b --device cuda          # GPU host: ~14.5 GB of disk

Shapes are Llama/Mistral decoder layouts with Hugging Face tensor names: `7b` is
Mistral-7B-Instruct-v0.2 (32 layers, hidden 4096, MLP 14336, 8 KV heads, vocab 32000: 7.24B
parameters), `1b` TinyLlama-1.1B's, `100m` the `pairloop_local.tiny_models` 100m preset's. Weights are
random bf16, sharded as `save_pretrained` does (tensors in order, a new shard before one would
pass `--shard-gb`, 5 GB by default; `model.safetensors.index.json` maps names to shards).

    write       save every shard, fsync, index, rename the directory into place (atomic publish);
                random-number generation is outside the timed window
    read cold   the page cache dropped for the shards first (posix_fadvise DONTNEED after fsync),
                then `safetensors.torch.load_file(shard, device=...)` for every shard; on cuda the
                time ends after `torch.cuda.synchronize()`; on cpu each tensor is also copied out
                of safetensors' mmap (else nothing is read: the pages load lazily on first touch)
    read warm   the same again, files now in the page cache

Read-back is checked: the first and last 64 values of every tensor must match what was written.
Figures are printed and merged into bench/results/weights_io.json under "SHAPE-DEVICE".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pairloop.atomic import atomic_write_json, atomic_write_text, publish_dir

RESULTS = Path(__file__).resolve().parent / "results"
BYTES_PER_PARAM = 2  # bf16
PROBE = 64  # values checked at each end of every tensor


@dataclass(frozen=True)
class Shape:
    """A Llama/Mistral decoder's tensor shapes (untied embeddings, grouped-query attention)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES: dict[str, Shape] = {
    "7b": Shape(vocab=32000, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8),
    "1b": Shape(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
    "100m": Shape(vocab=4096, hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4),
}


def tensor_shapes(s: Shape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) in Hugging Face's state-dict order."""
    kv = s.kv_heads * s.head_dim
    yield "model.embed_tokens.weight", (s.vocab, s.hidden)
    for i in range(s.layers):
        p = f"model.layers.{i}"
        yield f"{p}.self_attn.q_proj.weight", (s.hidden, s.hidden)
        yield f"{p}.self_attn.k_proj.weight", (kv, s.hidden)
        yield f"{p}.self_attn.v_proj.weight", (kv, s.hidden)
        yield f"{p}.self_attn.o_proj.weight", (s.hidden, s.hidden)
        yield f"{p}.mlp.gate_proj.weight", (s.intermediate, s.hidden)
        yield f"{p}.mlp.up_proj.weight", (s.intermediate, s.hidden)
        yield f"{p}.mlp.down_proj.weight", (s.hidden, s.intermediate)
        yield f"{p}.input_layernorm.weight", (s.hidden,)
        yield f"{p}.post_attention_layernorm.weight", (s.hidden,)
    yield "model.norm.weight", (s.hidden,)
    yield "lm_head.weight", (s.vocab, s.hidden)


def plan_shards(s: Shape, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy, in order, as `save_pretrained`: start a new shard before one would overflow."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensor_shapes(s):
        size = math.prod(shape) * BYTES_PER_PARAM
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += size
    return shards


def _probe(t: Any) -> tuple[list[float], list[float]]:
    flat = t.reshape(-1)
    return flat[:PROBE].float().tolist(), flat[-PROBE:].float().tolist()


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_checkpoint(
    out: Path, s: Shape, shard_bytes: int, seed: int
) -> tuple[float, dict[str, Any], list[Path]]:
    """Write the sharded checkpoint to `out`; returns (timed seconds, probes, shard paths)."""
    import torch
    from safetensors.torch import save_file

    plan = plan_shards(s, shard_bytes)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    probes: dict[str, Any] = {}
    weight_map: dict[str, str] = {}
    total = 0
    seconds = 0.0
    for fname, shard in zip(names, plan, strict=True):
        # Random weights (std 0.02, as an initialiser would), made outside the timed window.
        tensors = {
            n: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for n, shape in shard
        }
        for n, t in tensors.items():
            probes[n] = _probe(t)
            weight_map[n] = fname
            total += t.numel() * BYTES_PER_PARAM
        t0 = time.perf_counter()
        save_file(tensors, staging / fname, metadata={"format": "pt"})
        fd = os.open(staging / fname, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        seconds += time.perf_counter() - t0
        del tensors
    t0 = time.perf_counter()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(staging / "model.safetensors.index.json", json.dumps(index, indent=2))
    publish_dir(staging, out)
    seconds += time.perf_counter() - t0
    return seconds, probes, [out / n for n in names]


def read_checkpoint(shards: list[Path], device: str, probes: dict[str, Any]) -> float:
    """Load every shard onto `device`; check the probes; return the seconds it took."""
    import torch
    from safetensors.torch import load_file

    seconds = 0.0
    for path in shards:
        t0 = time.perf_counter()
        tensors = load_file(path, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        else:
            # On CPU, safetensors hands out tensors over its mmap: nothing is read until touched.
            # A copy reads every byte, as a loader copying into its parameters does.
            tensors = {name: t.clone() for name, t in tensors.items()}
        seconds += time.perf_counter() - t0
        for name, t in tensors.items():
            if _probe(t) != probes[name]:
                raise RuntimeError(f"{name} in {path.name} reads back different values")
        del tensors
    return seconds


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, in 10^9 bytes")
    p.add_argument("--workdir", type=Path, help="where the checkpoint goes (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="leave the checkpoint on disk")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    console = Console()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("error: --device cuda, but torch sees no CUDA device here; use --device cpu")
        return 2
    shape = SHAPES[args.shape]
    params = sum(math.prod(sh) for _, sh in tensor_shapes(shape))
    size = params * BYTES_PER_PARAM
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pairloop-bench-weights-"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < size * 1.1:
        console.print(
            f"error: the {args.shape} checkpoint needs {size / 1e9:.1f} GB and {work} has "
            f"{free / 1e9:.1f} GB free: pick a smaller --shape or another --workdir"
        )
        return 2

    out = work / f"weights-{args.shape}"
    shutil.rmtree(out, ignore_errors=True)
    try:
        write_s, probes, shards = write_checkpoint(out, shape, int(args.shard_gb * 1e9), args.seed)
        for path in shards:
            _drop_from_page_cache(path)
        cold_s = read_checkpoint(shards, args.device, probes)
        warm_s = read_checkpoint(shards, args.device, probes)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    result = {
        "shape": args.shape,
        "layout": asdict(shape),
        "device": args.device,
        "device_name": device_name or platform.machine(),
        "params": params,
        "bytes": size,
        "shards": len(shards),
        "shard_gb": args.shard_gb,
        "write_s": write_s,
        "read_cold_s": cold_s,
        "read_warm_s": warm_s,
        "write_gb_per_s": size / 1e9 / write_s,
        "read_cold_gb_per_s": size / 1e9 / cold_s,
        "read_warm_gb_per_s": size / 1e9 / warm_s,
        "command": "python -m bench.weights_io " + " ".join(argv or sys.argv[1:]),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "workdir": str(work),
    }
    table = Table(
        title=f"Weight I/O: {args.shape} shapes ({params / 1e9:.2f}B params, bf16, "
        f"{size / 1e9:.2f} GB in {len(shards)} shard(s)), read to {args.device.upper()}"
    )
    for col in ("step", "seconds", "GB/s"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for step, key in (("write (fsync'd)", "write"), ("read, cold", "read_cold"),
                      ("read, warm", "read_warm")):  # fmt: skip
        table.add_row(step, f"{result[key + '_s']:.2f}", f"{result[key + '_gb_per_s']:.2f}")
    console.print(table)

    path = RESULTS / "weights_io.json"
    report: dict[str, Any] = (
        json.loads(path.read_text()) if path.exists() else {"benchmark": "weights_io"}
    )
    report.setdefault("runs", {})[f"{args.shape}-{args.device}"] = result
    atomic_write_json(path, report)
    console.print(f"written: {path} (key {args.shape}-{args.device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

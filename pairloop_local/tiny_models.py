"""Tiny chat models built offline, in seconds, for tests and deployment smoke tests.

    pairloop tiny-models OUT_DIR            # writes OUT_DIR/tiny-llama, tiny-mistral, tiny-pairrm

Each model is a real Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json,
chat template, generation_config.json) with a byte-level BPE tokenizer trained here on a small
built-in corpus, so no hub is needed. head_dim is 32 because vLLM's CPU attention rejects 16.
Weights are initialised wider than the usual 0.02 so that greedy decoding has clear winners:
random tiny models with near-uniform logits make "vLLM equals transformers" tests flaky on ties.

A model is built in a hidden staging directory beside its destination, its marker
(`pairloop_tiny.json`, TINY_MARKER) written last, then renamed into place: a build killed at any
moment leaves no half-written model at the destination, and `is_built(dir)` (the marker) is the one
test of "built" (also in docker-compose.cpu.yml and the cpu-demo overlay, on `tiny-models.complete`,
which `build_tiny_models` writes once all three are in place).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pairloop.atomic import publish_dir
from pairloop_local.corpus import training_corpus

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

Arch = Literal["llama", "mistral"]
ARCHES: tuple[Arch, ...] = ("llama", "mistral")

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"

# ChatML-style template: supports a system turn, and `add_generation_prompt` opens the assistant turn.
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Mistral-Instruct-v0.2 style: [INST] ... [/INST]; a system turn is folded into the first user turn,
# as Mistral's own template does; roles must alternate.
MISTRAL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first %}{{ '[INST] ' + system + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

CHAT_TEMPLATES: dict[Arch, str] = {"llama": LLAMA_CHAT_TEMPLATE, "mistral": MISTRAL_CHAT_TEMPLATE}

TINY_MARKER = "pairloop_tiny.json"  # written last: its presence means the model is complete
ALL_BUILT_MARKER = "tiny-models.complete"  # in build_tiny_models' root, once all are in place


def is_built(model_dir: str | Path) -> bool:
    """True when `model_dir` holds a complete tiny model (its marker is there)."""
    return (Path(model_dir) / TINY_MARKER).is_file()


def staging_for(out: Path) -> Path:
    """A fresh staging directory beside `out` (same filesystem: the final rename is atomic);
    staging directories of earlier, killed builds are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    staging.mkdir()
    return staging


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny causal LM. The defaults give about 0.3M parameters."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 128
    vocab_size: int = 1024
    max_position_embeddings: int = 2048
    init_std: float = 0.25


PRESETS: dict[str, TinySpec] = {
    "tiny": TinySpec(),
    # ~100M parameters: the benchmarks' "real-ish" size (forward passes dominate, swap moves 400 MB).
    "100m": TinySpec(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        intermediate_size=2048,
        vocab_size=4096,
        init_std=0.05,
    ),
}


def build_tokenizer(
    *, vocab_size: int, chat_template: str, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the built-in corpus (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    # transformers leaves the tokenizer's __init__ unannotated.
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # see above
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template
    return fast


def _config(arch: Arch, spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    from transformers import LlamaConfig, MistralConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if arch == "llama":
        return LlamaConfig(**common)
    return MistralConfig(sliding_window=None, **common)


def build_tiny_chat_model(
    out_dir: str | Path,
    *,
    arch: Arch = "llama",
    preset: str = "tiny",
    seed: int = 0,
    max_position_embeddings: int | None = None,
) -> Path:
    """Write a tiny chat model in Hugging Face format to `out_dir` and return that path.

    The same (arch, preset) always gets the same tokenizer; `seed` changes only the weights, so
    two seeds give checkpoints with identical names and shapes but different outputs.
    `max_position_embeddings` overrides the preset's context (RoPE: no weight depends on it).
    `out_dir` is the model's own directory: it is built beside it and replaces it as a whole.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    spec = PRESETS[preset]
    if max_position_embeddings is not None:
        spec = replace(spec, max_position_embeddings=max_position_embeddings)
    final = Path(out_dir)
    out = staging_for(final)

    tokenizer = build_tokenizer(
        vocab_size=spec.vocab_size,
        chat_template=CHAT_TEMPLATES[arch],
        model_max_length=spec.max_position_embeddings,
    )
    config = _config(arch, spec, tokenizer)
    torch.manual_seed(seed)
    # transformers leaves these two unannotated.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]  # see above
    model.eval()
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]  # see above
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / TINY_MARKER).write_text(
        json.dumps({"arch": arch, "preset": preset, "seed": seed}, indent=2) + "\n"
    )
    publish_dir(out, final)
    return final


def build_tiny_models(
    out_dir: str | Path, *, preset: str = "tiny", seed: int = 0
) -> dict[str, Path]:
    """Build every tiny model under `out_dir`: tiny-llama, tiny-mistral and tiny-pairrm (the
    ranker, `pairloop_local.tiny_ranker`; key "pairrm")."""
    from pairloop_local.tiny_ranker import PAIRRM_PRESETS, build_tiny_pairrm

    root = Path(out_dir)
    built: dict[str, Path] = {
        arch: build_tiny_chat_model(root / f"tiny-{arch}", arch=arch, preset=preset, seed=seed)
        for arch in ARCHES
    }
    ranker_preset = preset if preset in PAIRRM_PRESETS else "tiny"
    built["pairrm"] = build_tiny_pairrm(root / "tiny-pairrm", preset=ranker_preset, seed=seed)
    (root / ALL_BUILT_MARKER).write_text(json.dumps({"preset": preset, "seed": seed}) + "\n")
    return built


def build_tiny_reward_model(chat_model: str | Path, out_dir: str | Path, *, seed: int = 0) -> Path:
    """A tiny reward model from a tiny chat model: the same weights under a freshly seeded
    one-label sequence-classification head (`--backend reward-model`), written to `out_dir`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    final = Path(out_dir)
    out = staging_for(final)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(chat_model, num_labels=1)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(chat_model).save_pretrained(out)
    (out / TINY_MARKER).write_text(json.dumps({"reward_model_of": str(chat_model), "seed": seed}) + "\n")
    publish_dir(out, final)
    return final

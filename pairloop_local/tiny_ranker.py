"""A tiny PairRM checkpoint built offline, in seconds, that llm-blender's own loader accepts.

    pairloop tiny-models OUT_DIR        # also writes OUT_DIR/tiny-pairrm (this module)

Layout, as `Blender().loadranker(OUT_DIR/tiny-pairrm)` reads it (the same as `llm-blender/PairRM`):

    tiny-pairrm/config.json         ranker_type pairranker, model_type deberta, model_name = backbone
    tiny-pairrm/model.safetensors   the whole CrossCompareReranker: `pretrained_model.*` + `head_layer.*`
    tiny-pairrm/backbone/           a DeBERTa-v2 backbone (config, weights) with a sentencepiece
                                    tokenizer (`spm.model`) trained here on a small built-in corpus

The backbone has DeBERTa-v3's attention (relative positions, p2c|c2p, no absolute position input),
like `microsoft/deberta-v3-large` under the real PairRM. The embedding matrix in model.safetensors
has four rows more than the backbone's tokenizer: llm-blender's collator adds PairRM's prefix tokens
(`<|source|>`, `<|candidate1|>`, `<|candidate2|>`, `<|candidate|>`) at load time and resizes.

A random PairRM with the usual 0.02 init scores every candidate within ~1e-4 of the others, which
makes rank comparisons meaningless; weights here are initialised wider so scores spread over O(1).
`config.json` names the backbone by absolute path (llm-blender resolves it against the working
directory); pairloop's ranker also accepts a path relative to the checkpoint directory.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pairloop_local.corpus import training_corpus

if TYPE_CHECKING:
    import torch
    from transformers import DebertaV2Config

__all__ = ["PAIRRM_PREFIX_TOKENS", "PAIRRM_PRESETS", "PairRMSpec", "build_tiny_pairrm"]

# Added by llm-blender's CrossCompareCollator when the ranker loads (see module docstring).
PAIRRM_PREFIX_TOKENS = ("<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>")


@dataclass(frozen=True)
class PairRMSpec:
    """Shape of a DeBERTa-v2 backbone for a PairRM checkpoint."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    position_buckets: int = 64
    vocab_size: int = 1000  # a target: sentencepiece stops earlier on the small corpus
    init_std: float = 0.3  # backbone; the head is scaled by fan-in (see _head_weights)


PAIRRM_PRESETS: dict[str, PairRMSpec] = {
    "tiny": PairRMSpec(),
    # The CPU benchmark's size: large enough that forward passes are nearly all of the time.
    "mid": PairRMSpec(
        hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, position_buckets=256
    ),
    # DeBERTa-v3-base shape (the `pairloop tiny-models --preset 100m` companion).
    "100m": PairRMSpec(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        position_buckets=256,
        init_std=0.1,
    ),
    # DeBERTa-v3-large shape, as under llm-blender/PairRM (the GPU benchmark); vocabulary excepted.
    "large": PairRMSpec(
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        intermediate_size=4096,
        position_buckets=256,
        init_std=0.1,
    ),
}


# Common words of prompts and answers, so that the tokenizer keeps whole words (fewer tokens per
# text: faster tests) rather than spelling them out from the chat models' small corpus alone.
_EXTRA_CORPUS = """
The answer is yes, because the question asks for a short and clear explanation of the idea.
First, we need to understand the problem; then we can describe a simple solution step by step.
Here is an example: the function returns a sorted list of numbers, from the smallest to the largest.
I think this is a good question. There are many ways to learn something new every day at home.
Water boils at one hundred degrees, and light travels faster than sound through the air around us.
Please make sure that your response is helpful, honest and harmless, and that it follows the request.
A good story has a beginning, a middle and an end; the main character changes over time.
In summary, the best approach depends on your goals, your time and the resources you have.
Sorry, I cannot help with that request. However, I can suggest other useful options for you.
Why is the sky blue? Sunlight scatters in the atmosphere, and blue light scatters the most.
"""


def _train_sentencepiece(vocab_size: int) -> bytes:
    """A unigram sentencepiece model with DeBERTa-v3's special ids ([PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3)."""
    import sentencepiece as spm

    extra = [line.strip() for line in _EXTRA_CORPUS.strip().splitlines()]
    corpus = training_corpus() + extra + [line.lower() for line in extra]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # the corpus is small: take what it supports, deterministically
        character_coverage=1.0,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="[PAD]",
        bos_piece="[CLS]",
        eos_piece="[SEP]",
        unk_piece="[UNK]",
        user_defined_symbols=["[MASK]"],
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _backbone_config(spec: PairRMSpec, vocab_size: int) -> DebertaV2Config:
    from transformers import DebertaV2Config

    # microsoft/deberta-v3-large's attention settings, at `spec`'s size. position_buckets,
    # norm_rel_ebd and share_att_key are not declared fields of the config class: the model reads
    # them with getattr, so they pass as extra keyword arguments.
    return DebertaV2Config(  # type: ignore[call-arg]  # the three undeclared settings above
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        hidden_act="gelu",
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=spec.position_buckets,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
        layer_norm_eps=1e-7,
        initializer_range=spec.init_std,
        pad_token_id=0,
    )


def _head_weights(hidden: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """PairRM's head: Linear(2h, h) -> tanh -> Linear(h, 1), scaled so outputs are O(1).

    LayerNorm'd encodings have unit variance per dimension; std 1/sqrt(fan_in) keeps the first
    layer in tanh's responsive range and 2/sqrt(h) gives the score a spread of about one.
    """
    import torch

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    return {
        "head_layer.1.weight": normal(hidden, 2 * hidden, std=(2 * hidden) ** -0.5),
        "head_layer.1.bias": torch.zeros(hidden),
        "head_layer.4.weight": normal(1, hidden, std=2 * hidden**-0.5),
        "head_layer.4.bias": torch.zeros(1),
    }


def build_tiny_pairrm(out_dir: str | Path, *, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a PairRM checkpoint (random weights, `preset` shape) to `out_dir` and return the path.

    The tokenizer does not depend on `seed`; the weights do.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, DebertaV2Model

    if preset not in PAIRRM_PRESETS:
        raise ValueError(f"preset must be one of {sorted(PAIRRM_PRESETS)}, got {preset!r}")
    spec = PAIRRM_PRESETS[preset]
    out = Path(out_dir).resolve()
    backbone_dir = out / "backbone"
    backbone_dir.mkdir(parents=True, exist_ok=True)

    for stale in ("tokenizer.json", "special_tokens_map.json", "added_tokens.json"):
        (backbone_dir / stale).unlink(missing_ok=True)  # else loading ignores the new spm.model
    (backbone_dir / "spm.model").write_bytes(_train_sentencepiece(spec.vocab_size))
    (backbone_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": False}, indent=2)
        + "\n"
    )
    # Loading converts spm.model to a fast tokenizer, as for microsoft/deberta-v3-large.
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)

    torch.manual_seed(seed)
    # transformers leaves the model's __init__ and eval() unannotated.
    config = _backbone_config(spec, vocab_size=len(tokenizer))
    backbone = DebertaV2Model(config).eval()  # type: ignore[no-untyped-call]  # see above
    backbone.save_pretrained(backbone_dir, safe_serialization=True)

    # The ranker's copy: embeddings resized for the prefix tokens the collator adds at load time.
    backbone.resize_token_embeddings(
        len(tokenizer) + len(PAIRRM_PREFIX_TOKENS), mean_resizing=False
    )
    state = {f"pretrained_model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    state.update(_head_weights(spec.hidden_size, torch.Generator().manual_seed(seed + 1)))
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})

    ranker_config = {
        "ranker_type": "pairranker",
        "model_type": "deberta",
        "model_name": str(backbone_dir),
        # PairRM's own limits (tokens, specials included).
        "source_maxlength": 1224,
        "candidate_maxlength": 412,
        "n_tasks": 1,
        "drop_out": 0.05,
        "inference_mode": "bubble",
        "fp16": True,
    }
    (out / "config.json").write_text(json.dumps(ranker_config, indent=2) + "\n")
    (out / "pairloop_tiny.json").write_text(
        json.dumps({"arch": "pairrm", "preset": preset, "seed": seed}, indent=2) + "\n"
    )
    return out

"""The trainer cuts a prompt above `max_prompt_length` by the project's one rule (keep the end,
`pairloop.truncation.keep_end`), the rule prompt admission cuts by too: a real TRL DPOTrainer on
the tiny Llama, its prepared dataset compared with the uncut one's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pairloop.truncation import keep_end
from services.trainer.dpo import dpo_trainer_class

CAP = 8


def _prepared_prompt_ids(model_dir: Path, tmp_path: Path, cap: int | None) -> list[int]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    prompt = "Background. " * 10 + "So, what is the question?"
    row: dict[str, Any] = {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": "A good answer."}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    trainer_cls = dpo_trainer_class()
    trainer_cls.max_prompt_length = cap
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = trainer_cls(
        model=model,
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=DPOConfig(
            output_dir=str(tmp_path / f"out-{cap}"),
            bf16=False,
            gradient_checkpointing=False,
            report_to="none",
            max_length=1024,
            use_cpu=True,
        ),
        train_dataset=datasets.Dataset.from_list([row]),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    return list(trainer.train_dataset[0]["prompt_ids"])


def test_the_trainer_keeps_the_end_of_a_long_prompt(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    full = _prepared_prompt_ids(tiny_models["llama"], tmp_path, None)
    cut = _prepared_prompt_ids(tiny_models["llama"], tmp_path, CAP)
    assert len(full) > CAP
    assert cut == keep_end(full, CAP) == full[-CAP:]

"""Prompt admission at run creation, with the tiny base model's real tokenizer and chat template:
over-long prompts skipped (replaced from the pool, slices keep their size) or truncated to fit,
empty ones skipped, all counted in the manifest; a pool too small is an error that says how many
were found and needed, which prompts were refused (id, first characters, limit) and what to change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.admission import TokenizerMeter, admission_summary, prompt_limit
from orchestrator.config import ConfigError, load_run_config
from orchestrator.manifest import load_manifest
from orchestrator.prompts import read_prompts
from orchestrator.runs import create_run

# The tiny models' context is 2048 tokens; run configs here ask for 64 new tokens.
CONTEXT = 2048
NEW = 64


@pytest.fixture()
def meter(store: Path) -> TokenizerMeter:
    return TokenizerMeter.from_pretrained(str(store / "models" / "base"))


def write_pool(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pool_rows(n_short: int, long_ids: list[int], *, long_words: int = 3000) -> list[dict[str, Any]]:
    rows = []
    for i in range(n_short):
        long = f"Tell me a very long story. {i} " + "word " * long_words + f"What happens in {i}?"
        text = long if i in long_ids else ""
        rows.append({"prompt_id": f"p{i}", "prompt": text or f"Question number {i}?"})
    return rows


def run_config(write_config: Any, source: Path, **prompts: Any) -> Path:
    return write_config(
        prompts={"source": str(source), "per_iteration": 10, "eval_prompts": 6, **prompts},
        sampling={"max_tokens": NEW},
        evaluation={"max_tokens": NEW},
    )


def test_overlong_and_empty_prompts_are_skipped_replaced_and_counted(
    tmp_path: Path, write_config: Any, meter: TokenizerMeter
) -> None:
    long_ids = [3, 7, 11, 19, 30]
    rows = pool_rows(50, long_ids)
    rows += [{"prompt_id": "blank", "prompt": "   \n\t"}, {"prompt_id": "none", "prompt": ""}]
    rows += [{"prompt_id": "dup", "prompt": "Question number 4?"}]
    rows += [{"prompt_id": f"x{i}", "prompt": v} for i, v in enumerate([["a"], None, 3])]
    source = write_pool(tmp_path / "pool.jsonl", rows)
    run_dir = create_run(run_config(write_config, source))

    slices = {
        name: read_prompts(run_dir / "prompts" / f"{name}.jsonl")
        for name in ("eval", "iteration_1", "iteration_2")
    }
    assert [len(s) for s in slices.values()] == [6, 10, 10], "every slice keeps its size"
    used = [p["prompt_id"] for s in slices.values() for p in s]
    assert len(set(used)) == 26 and not set(used) & {f"p{i}" for i in long_ids}
    limit = CONTEXT - NEW
    assert max(meter.count([p["prompt"] for s in slices.values() for p in s])) <= limit

    m = load_manifest(run_dir).stages["setup"].metrics["prompts"]
    skipped = read_prompts(run_dir / "prompts" / "skipped.jsonl")
    assert m["too_long_skipped"] == m["too_long"] == len(skipped)
    assert {s["prompt_id"] for s in skipped} <= {f"p{i}" for i in long_ids}
    assert m["empty_skipped"] == 2 and m["duplicates_dropped"] == 1
    assert m["admitted"] == 26 and m["examined"] == 26 + m["too_long_skipped"]
    assert m["prompt_token_limit"] == limit
    assert "2048 tokens (the base model's) minus 64 new tokens" in m["prompt_token_limit_reason"]
    for s in skipped:
        assert s["tokens"] > limit and s["limit"] == limit and "Tell me a very long" in s["prompt"]
    assert f"limit {limit} prompt tokens" in admission_summary(m)
    # Rows whose prompt is no text are counted as what they are, not as "empty".
    assert m["not_string_skipped"] == {"list": 1, "null": 1, "number": 1}
    assert "2 empty, 3 not a string (1 list, 1 null, 1 number);" in admission_summary(m)


def test_the_limit_is_exact_at_the_boundary(
    tmp_path: Path, write_config: Any, meter: TokenizerMeter
) -> None:
    limit = CONTEXT - NEW
    # Grow a prompt character by character to exactly `limit` rendered tokens, then one past it.
    text, step = "Tell me about " + "abcdefghij " * 100, 0
    while meter.count([text])[0] < limit:
        text += "abcdefghij "[step % 11]
        step += 1
    fits = text
    over = fits + "!"
    assert meter.count([fits])[0] == limit and meter.count([over])[0] > limit
    rows = pool_rows(27, [])  # 26 needed: every prompt but one must be admitted
    rows[0]["prompt"], rows[1]["prompt"] = fits, over
    cfg_path = run_config(write_config, write_pool(tmp_path / "pool.jsonl", rows))
    run_dir = create_run(cfg_path)
    admitted = {
        p["prompt_id"]
        for name in ("eval", "iteration_1", "iteration_2")
        for p in read_prompts(run_dir / "prompts" / f"{name}.jsonl")
    }
    assert "p0" in admitted and "p1" not in admitted and len(admitted) == 26


def test_truncate_cuts_overlong_prompts_to_fit(
    tmp_path: Path, write_config: Any, meter: TokenizerMeter
) -> None:
    rows = pool_rows(26, [0, 5, 9])
    cfg_path = run_config(
        write_config, write_pool(tmp_path / "pool.jsonl", rows), too_long="truncate"
    )
    run_dir = create_run(cfg_path)
    prompts = {
        p["prompt_id"]: p["prompt"]
        for name in ("eval", "iteration_1", "iteration_2")
        for p in read_prompts(run_dir / "prompts" / f"{name}.jsonl")
    }
    assert len(prompts) == 26, "the whole pool was needed, truncated prompts included"
    for pid in ("p0", "p5", "p9"):
        tokens = meter.count([prompts[pid]])[0]
        assert CONTEXT - NEW - 8 <= tokens <= CONTEXT - NEW
        # The end is kept, as the trainer keeps it: the question comes last.
        assert prompts[pid].endswith(f"word word What happens in {pid[1:]}?")
        assert not prompts[pid].startswith("Tell me")
    m = load_manifest(run_dir).stages["setup"].metrics["prompts"]
    assert (m["too_long_truncated"], m["too_long_skipped"]) == (3, 0)


def test_a_pool_too_small_says_found_needed_why_and_what_to_change(
    tmp_path: Path, write_config: Any
) -> None:
    rows = [*pool_rows(27, [2, 4]), {"prompt_id": "blank", "prompt": "  "}]
    cfg_path = run_config(write_config, write_pool(tmp_path / "pool.jsonl", rows))
    with pytest.raises(ConfigError) as err:
        create_run(cfg_path)
    msg = str(err.value)
    assert "found 25 usable prompts" in msg and "needs 26 (6 eval + 2 x 10)" in msg
    assert "2 longer than 1984 tokens" in msg and "1 empty or whitespace-only" in msg
    assert "prompts.too_long: truncate" in msg and "lower prompts.per_iteration" in msg
    assert "skipped 'p2' ('Tell me a very long story." in msg
    assert not list((tmp_path / "store").glob("runs/*")), "nothing written"


def test_prompt_limit_takes_the_tightest_of_context_new_tokens_and_trainer(
    write_config: Any, prompts_file: Path
) -> None:
    def limit(**overrides: Any) -> Any:
        return prompt_limit(load_run_config(write_config(**overrides)))

    assert limit(sampling={"max_tokens": 100}, evaluation={"max_tokens": 50}).tokens == 1948
    got = limit(sampling={"max_tokens": 100}, evaluation={"max_tokens": 300})
    assert got.tokens == 1748 and "evaluation.max_tokens" in got.reason
    got = limit(sampling={"max_tokens": 100, "max_model_len": 1024}, evaluation={"enabled": False})
    assert got.tokens == 924 and "sampling.max_model_len" in got.reason
    got = limit(
        sampling={"max_tokens": 100},
        prompts={"enforce_max_prompt_length": True},
        dpo={"max_prompt_length": 256, "max_length": 512},
    )
    assert got.tokens == 256 and "dpo.max_prompt_length" in got.reason
    with pytest.raises(ConfigError, match=r"lower sampling\.max_tokens"):
        limit(sampling={"max_tokens": 4096})

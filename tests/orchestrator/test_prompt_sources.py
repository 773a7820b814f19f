"""Prompt sources as users have them: AlpacaEval's hub repo in the HF cache (offline), bad rows,
malformed files, repeated ids. Hub loading runs in a child process: `huggingface_hub` reads its
cache location and offline switch from the environment when imported."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import ConfigError, EvalPromptsConfig, PromptsConfig
from orchestrator.prompts import load_eval_prompts, load_prompt_source

ROOT = Path(__file__).resolve().parents[2]
REVISION = "5f4c3a2b1e0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b"
# The loading script AlpacaEval's repo ships beside its JSON files (what datasets 5 refuses).
SCRIPT = """import datasets
_URLS = {"alpaca_eval": "./alpaca_eval.json",
         "alpaca_eval_gpt4_baseline": "./alpaca_eval_gpt4_baseline.json"}
class AlpacaFarmDataset(datasets.GeneratorBasedBuilder):
    pass
"""


def _alpaca_rows(generator: str) -> list[dict[str, str]]:
    return [
        {
            "instruction": f"Instruction number {i}: what is {i} squared?",
            "output": f"{i * i}",
            "generator": generator,
            "dataset": "helpful_base" if i % 2 else "koala",
        }
        for i in range(7)
    ]


def _hf_cache(root: Path) -> Path:
    """An HF hub cache holding tatsu-lab/alpaca_eval as huggingface_hub lays a download out:
    blobs named by content hash, a snapshot of symlinks per revision, refs/main -> the revision."""
    repo = root / "hub" / "datasets--tatsu-lab--alpaca_eval"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    files = {
        "alpaca_eval.py": SCRIPT,
        "alpaca_eval.json": json.dumps(_alpaca_rows("gpt4_1106_preview")),
        "alpaca_eval_gpt4_baseline.json": json.dumps(_alpaca_rows("gpt4_1106_preview")),
        "README.md": "---\nlicense: cc-by-nc-4.0\n---\n",
    }
    for name, text in files.items():
        blob = repo / "blobs" / hashlib.sha256(text.encode()).hexdigest()
        blob.write_text(text)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return root


def _offline_child(hf_home: Path, code: str) -> Any:
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(hf_home / "datasets"),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _readme_reference_snippet() -> str:
    """The Python of the README's `REF=$(python -c '...')` line before `alpaca_eval evaluate`."""
    found = re.search(r"REF=\$\(python -c '([^']+)'\)", (ROOT / "README.md").read_text())
    assert found, "README: no REF=$(python -c '...') line for alpaca_eval's reference"
    return found.group(1)


def test_alpaca_eval_loads_as_published_from_the_hf_cache_offline(tmp_path: Path) -> None:
    hf_home = _hf_cache(tmp_path / "hf")
    code = f"""
import contextlib, io, json
from orchestrator.config import ConfigError, EvalPromptsConfig
from orchestrator.prompts import load_eval_prompts
out = {{"records": load_eval_prompts(EvalPromptsConfig())}}
for source in ("nobody/missing", "tatsu-lab/alpaca_eval"):
    try:
        load_eval_prompts(EvalPromptsConfig(source=source, name="no_such_config"))
    except ConfigError as exc:
        out.setdefault("errors", []).append(str(exc))
with contextlib.redirect_stdout(io.StringIO()) as ref:
    exec({_readme_reference_snippet()!r})
from alpaca_eval.utils import load_or_convert_to_dataframe
out["reference"] = load_or_convert_to_dataframe(ref.getvalue().strip()).to_dict("records")
print(json.dumps(out))
"""
    got = _offline_child(hf_home, code)
    rows = _alpaca_rows("gpt4_1106_preview")
    assert [r["prompt"] for r in got["records"]] == [r["instruction"] for r in rows]
    assert [r["index"] for r in got["records"]] == [str(i) for i in range(len(rows))]
    assert [r["dataset"] for r in got["records"]] == [r["dataset"] for r in rows]
    # Whatever fails on the hub: one line, the dataset named, and the local-file alternative.
    for message in got["errors"]:
        assert "\n" not in message
        assert message.startswith("evaluation.prompts.source: cannot load dataset")
        assert "local .jsonl/.json/.parquet file" in message
    # The README's alpaca_eval command reads AlpacaEval 2.0's reference from the same cache.
    assert [r["instruction"] for r in got["reference"]] == [r["instruction"] for r in rows]
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"alpaca_eval evaluate [^\n]*(?:\\\n[^\n]*)*", readme)
    assert commands and all('--reference_outputs "$REF"' in c for c in commands)


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_non_text_prompt_fields_are_named_or_counted_as_what_they_are(tmp_path: Path) -> None:
    good = [{"prompt": f"Question number {i}?", "messages": [{"role": "user"}]} for i in range(12)]
    bad = [{"prompt": ["a", "list"]}, {"prompt": None}, {"prompt": 3}, {"prompt": "   "}]
    path = _jsonl(tmp_path / "p.jsonl", good + bad)
    pool = load_prompt_source(PromptsConfig(source=str(path), id_field=None))
    assert len(pool.records) == 12
    assert pool.not_string == {"list": 1, "null": 1, "number": 1}
    assert pool.empty == 1  # only the blank one is "empty"
    chats = _jsonl(tmp_path / "chats.jsonl", good)
    with pytest.raises(ConfigError, match=r"^prompts\.field: column 'messages' .* holds list"):
        load_prompt_source(PromptsConfig(source=str(chats), field="messages", id_field=None))
    eval_path = _jsonl(tmp_path / "e.jsonl", [{"instruction": {"text": "x"}}] * 3)
    with pytest.raises(ConfigError, match=r"evaluation\.prompts\.field: .* holds object values"):
        load_eval_prompts(EvalPromptsConfig(source=str(eval_path)))


def test_a_malformed_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"prompt": "two"}\n{prompt: "three"}\n')
    with pytest.raises(ConfigError) as err:
        load_prompt_source(PromptsConfig(source=str(path)))
    message = str(err.value)
    assert message.startswith(f"prompts.source: {path} line 4 is not valid JSON")
    assert "property name" in message and "\n" not in message
    _jsonl(path, [{"prompt": "one"}, ["not", "an", "object"]])
    with pytest.raises(ConfigError, match=r"line 2 holds a JSON list, not an object"):
        load_prompt_source(PromptsConfig(source=str(path)))


def test_one_id_for_two_prompts_is_an_error(tmp_path: Path) -> None:
    rows = [{"prompt": f"Question {i}?", "prompt_id": f"id{i % 3}"} for i in range(5)]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ConfigError, match=r"^prompts\.id_field: id 'id0' .* two different"):
        load_prompt_source(PromptsConfig(source=str(path)))
    # Ids hashed from the text are unique by construction.
    assert len(load_prompt_source(PromptsConfig(source=str(path), id_field=None)).records) == 5


def test_dataset_loads_read_only_the_needed_columns(tmp_path: Path) -> None:
    """A dataset repo's layout (parquet under data/), loaded through `datasets` as a hub name
    would be: UltraFeedback-like rows carry every response, and only prompt and id come back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.prompts import _rows_from_hub

    repo = tmp_path / "ultrafeedback-like"
    (repo / "data").mkdir(parents=True)
    table = pa.table(
        {
            "prompt": [f"Question {i}?" for i in range(6)],
            "prompt_id": [f"id{i}" for i in range(6)],
            "messages": [[{"role": "user", "content": "x" * 1000}]] * 6,
            "score_chosen": [9.0] * 6,
        }
    )
    pq.write_table(table, repo / "data" / "train_prefs-00000-of-00001.parquet")
    rows = _rows_from_hub(str(repo), "train_prefs", None, ["prompt", "prompt_id"], "prompts.source")
    assert rows == [{"prompt": f"Question {i}?", "prompt_id": f"id{i}"} for i in range(6)]
    pool = load_prompt_source(PromptsConfig(source=str(repo), split="train_prefs"))
    assert [r["prompt_id"] for r in pool.records] == [f"id{i}" for i in range(6)]
    with pytest.raises(ConfigError) as err:  # a split the dataset lacks: one line, the way out
        load_prompt_source(PromptsConfig(source=str(repo), split="test_prefs"))
    assert "\n" not in str(err.value) and "local .jsonl/.json/.parquet file" in str(err.value)

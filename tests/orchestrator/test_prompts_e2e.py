"""Real data never stops a run, through the real stack (vLLM generator, ranker, Celery trainer):

`pairloop demo --prompts`' config over a user's file where some prompts are far longer than the
tiny model's 2048-token context and some are blank: admission skips and counts them, the run goes
to the end, and the report and `pairloop status` say how many were skipped. A prompt that reaches
the generator anyway (injected after admission, as with a generator whose --max-model-len is
smaller than the run config says) gets an error entry in its shard; the rest of its batch is kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from orchestrator.demo import demo_config
from orchestrator.manifest import load_manifest
from orchestrator.records import GenerationRecord
from orchestrator.runs import create_run
from orchestrator.shards import ShardStore

pytestmark = pytest.mark.timeout(900)

LONG = "Please summarise this very long text. " + "lorem ipsum dolor " * 1500  # > 6000 tokens


def user_prompts(path: Path) -> Path:
    rows = [{"prompt": f"Write a short note about topic number {i}."} for i in range(40)]
    rows += [{"prompt": f"{i}: {LONG}"} for i in range(20)]
    rows += [{"prompt": "   "}, {"prompt": ""}]
    rows = [rows[i] for i in sorted(range(len(rows)), key=lambda i: (i * 7919) % len(rows))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_greedy(model_dir: Path, messages: list[dict[str, str]], new: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).rstrip("\ufffd")


def cli(stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        PAIRLOOP_ORCHESTRATOR_GENERATOR_ADMIN_TOKEN=stack.admin_token,
        PAIRLOOP_REDIS_URL=stack.redis_url,
        COLUMNS="250",
    )
    env.pop("PAIRLOOP_ORCHESTRATOR_FAULT_KILL_AFTER", None)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def test_user_prompts_too_long_for_the_model_are_skipped_and_the_run_completes(
    stack: Any, tmp_path: Path
) -> None:
    cfg = demo_config(
        store=stack.spec.store,
        base_model=stack.spec.base_model,
        generator_url=stack.generator_url,
        ranker_url=stack.ranker_url,
        redis_url=stack.redis_url,
        iterations=1,
        prompts_file=user_prompts(tmp_path / "mine.jsonl"),
    )
    # 60 distinct prompts: the demo plans for 45 of them (headroom for skips), in small shards.
    assert (cfg["prompts"]["eval_prompts"], cfg["prompts"]["per_iteration"]) == (7, 38)
    # Cheaper than the demo's sizes, same code paths.
    cfg["prompts"].update(eval_prompts=6, per_iteration=24)
    cfg["shard_size"] = 8
    cfg["dpo"]["num_train_epochs"] = 1
    cfg["evaluation"]["max_tokens"] = 16
    # One failure in 25 training prompts and one in 7 evaluation instructions are tolerated here.
    cfg["sampling"]["max_failed_share"] = 0.2
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = create_run(config, run_id="user-prompts")

    # After admission: one prompt the generator cannot take, in the middle of a shard.
    it1 = run_dir / "prompts" / "iteration_1.jsonl"
    lines = it1.read_text().splitlines()
    lines.insert(3, json.dumps({"prompt_id": "injected-long", "prompt": LONG}))
    it1.write_text("\n".join(lines) + "\n")
    # And one evaluation instruction: left out of the outputs and comparisons, counted.
    evals = run_dir / "prompts" / "eval.jsonl"
    lines = evals.read_text().splitlines()
    lines.insert(2, json.dumps({"prompt_id": "injected-eval", "prompt": LONG}))
    evals.write_text("\n".join(lines) + "\n")

    done = cli(stack, "resume", str(run_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    m = load_manifest(run_dir)
    assert m.status == "completed"

    admission = m.stages["setup"].metrics["prompts"]
    assert admission["too_long_skipped"] > 0 and admission["empty_skipped"] == 2
    assert admission["admitted"] == 30 and admission["prompt_token_limit"] == 2048 - 32
    assert admission["skipped_examples"][0]["tokens"] > 2048

    generate = m.stages["iter1.generate"].metrics
    assert generate["failed_prompts"] == 1 and generate["prompts"] == 25
    gen_dir = run_dir / "iter1" / "generations"
    records = list(ShardStore(gen_dir, GenerationRecord).read_all(4))
    (bad,) = [r for r in records if r.error]
    assert bad.prompt_id == "injected-long" and bad.responses == []
    assert "context of 2048 tokens" in (bad.error or "")
    neighbours = [r for r in records[:8] if r.prompt_id != "injected-long"]
    assert len(neighbours) == 7 and all(len(r.responses) == 5 for r in neighbours)
    # Only the failed prompt's line has an "error" key: shards without errors keep their bytes.
    lines = [x for f in sorted(gen_dir.glob("shard-*.jsonl")) for x in f.read_text().splitlines()]
    assert sum('"error"' in x for x in lines) == 1
    assert m.stages["iter1.pairs"].metrics["generation_errors"] == 1

    report = (run_dir / "report" / "report.md").read_text()
    assert f"{admission['too_long_skipped']} too long, 2 empty" in report
    assert "iter1.generate 1" in report
    for k, stage in ((0, "policy0.evaluate"), (1, "iter1.evaluate")):
        ev = m.stages[stage].metrics
        assert (ev["failed_prompts"], ev["eval_prompts"]) == (1, 7)
        outputs = json.loads(
            (run_dir / "eval" / f"policy{k}" / "alpaca_eval_outputs.json").read_text()
        )
        assert len(outputs) == 6 and all(o["instruction"] != LONG and o["output"] for o in outputs)
        assert f"policy {k}: 1 instructions the generator could not answer" in report
    annotations = json.loads(
        (run_dir / "eval" / "policy1" / "annotations_vs_base.json").read_text()
    )
    assert len(annotations) == 6 and m.stages["iter1.evaluate"].metrics["vs_base"]["n"] == 6
    status = cli(stack, "status", str(run_dir))
    assert status.returncode == 0
    assert f"skipped: {admission['too_long_skipped']} too long" in status.stdout
    assert "prompts the generator could not answer: 3" in status.stdout

    # The stack's generator was started without --dtype: `auto` served the checkpoint's float32,
    # so its greedy answer to a long chat prompt is transformers' own, token for token (vLLM's own
    # `auto` served bfloat16, and the answers parted after a dozen tokens).
    card = httpx.get(f"{stack.generator_url}/v1/models", timeout=30).json()["data"][0]
    assert (card["dtype"], card["max_model_len"]) == ("float32", 2048)
    assert card["weight_version"] == "user-prompts.policy1"
    messages = [
        {"role": "user", "content": "Explain, step by step, " + "why the sky is blue " * 20}
    ]
    reply = httpx.post(
        f"{stack.generator_url}/v1/chat/completions",
        json={"messages": messages, "temperature": 0, "max_tokens": 48, "min_tokens": 48},
        timeout=60,
    ).json()
    assert reply["usage"]["prompt_tokens"] > 100
    assert reply["choices"][0]["message"]["content"].rstrip("\ufffd") == hf_greedy(
        run_dir / "checkpoints" / "policy1", messages, 48
    )


def test_demo_prompts_file_that_does_not_exist_is_a_message(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "demo", "--workdir", str(tmp_path),
         "--prompts", str(tmp_path / "missing.jsonl")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    out = " ".join((done.stdout + done.stderr).split())  # errors go to stderr; Rich wraps paths
    assert "missing.jsonl is not a file" in out and "Traceback" not in done.stderr
    assert not (tmp_path / "store").exists(), "nothing was built or started"

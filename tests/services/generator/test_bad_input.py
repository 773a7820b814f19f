"""Bad input gets a 4xx with a message that says what to fix, never a 500, and changes nothing.

Bad swaps are refused before the engine is touched: afterwards the service still answers, with
the old version, from the old weights (checked against transformers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from pairloop.errors import ErrorResponse

from .conftest import MAX_BATCH_PROMPTS, MAX_BODY_BYTES, MAX_MODEL_LEN, MAX_N, MAX_TOKENS_LIMIT

CHAT = [{"role": "user", "content": "Why is the sky blue?"}]


def assert_error(r: httpx.Response, status: int, *fragments: str) -> ErrorResponse:
    assert r.status_code == status, r.text
    body = ErrorResponse.model_validate(r.json())
    for fragment in fragments:
        assert fragment.lower() in body.error.message.lower(), body.error.message
    return body


def swap(generator, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{generator.base_url}/admin/weights",
        json=body,
        headers=generator.admin_headers() if headers is None else headers,
        timeout=60,
    )


def assert_still_serving(generator, hf, version: str) -> None:
    r = httpx.post(
        f"{generator.base_url}/v1/chat/completions",
        json={"messages": CHAT, "temperature": 0, "max_tokens": 12},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["weight_version"] == version
    expected = hf.greedy_chat(generator.versions[version], CHAT, max_new=12)
    assert hf.settled(r.json()["choices"][0]["message"]["content"]) == expected


# --- admin authentication ------------------------------------------------------------------------


def test_swap_without_token_is_401_and_wrong_token_403(generator) -> None:
    body = {"path": "seed1", "version": "nope"}
    assert_error(swap(generator, body, headers={}), 401, "Bearer")
    assert_error(swap(generator, body, headers={"Authorization": "Basic abc"}), 401, "Bearer")
    assert_error(swap(generator, body, headers={"Authorization": "Bearer wrong"}), 403, "not valid")
    assert generator.current_version() != "nope"


# --- checkpoints that must be refused ------------------------------------------------------------


def _drop_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _reshape(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    rows, cols = tensors[name].shape
    tensors[name] = tensors[name].new_zeros(rows, cols + 3)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _rename(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weights"] = tensors.pop(
        "model.layers.1.mlp.down_proj.weight"
    )
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _truncate(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage(d: Path) -> None:
    (d / "model.safetensors").write_bytes(os.urandom(4096))


def _half(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = {k: v.half() for k, v in load_file(d / "model.safetensors").items()}
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _other_arch(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (d / "config.json").write_text(json.dumps(config))


def _no_config(d: Path) -> None:
    (d / "config.json").unlink()


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (_drop_weights, ["no *.safetensors"]),
        (_reshape, ["down_proj.weight", "shape", "[64, 131]", "expected [64, 128]"]),
        (_rename, ["missing", "unexpected"]),
        (_truncate, ["not a readable safetensors"]),
        (_garbage, ["not a readable safetensors"]),
        (_half, ["dtype", "F16"]),
        (_other_arch, ["architectures", "MistralForCausalLM"]),
        (_no_config, ["no config.json"]),
    ],
    ids=[
        "no-weights",
        "wrong-shape",
        "wrong-names",
        "truncated",
        "garbage",
        "fp16",
        "arch",
        "no-config",
    ],
)
def test_bad_checkpoint_is_refused_and_old_weights_keep_serving(
    generator, hf, store_copy, mutate: Callable[[Path], None], fragments: list[str]
) -> None:
    before = generator.current_version()
    bad = store_copy(f"bad-{mutate.__name__.strip('_')}")
    mutate(bad)
    r = swap(generator, {"path": bad.name, "version": generator.new_version("bad")})
    body = assert_error(r, 400, *fragments, f"still serving version {before!r}")
    assert body.error.param == "path"
    assert generator.current_version() == before
    assert_still_serving(generator, hf, before)


def test_paths_outside_the_store_are_403(generator, hf, tmp_path: Path) -> None:
    before = generator.current_version()
    outside = tmp_path / "outside"
    outside.mkdir()
    link = generator.model_root / "link-outside"
    link.symlink_to(outside, target_is_directory=True)
    try:
        for path in ["../seed1", "/etc", str(outside), "link-outside", "seed1/../../x"]:
            r = swap(generator, {"path": path, "version": generator.new_version("out")})
            assert_error(r, 403, "outside the model store root")
    finally:
        link.unlink()
    assert_error(swap(generator, {"path": "no-such-dir", "version": "x1"}), 400, "does not exist")
    assert generator.current_version() == before
    assert_still_serving(generator, hf, before)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"path": "seed1"}, "version"),
        ({"path": "seed1", "version": "has space"}, "version"),
        ({"path": "", "version": "v"}, "path"),
        ({"path": "seed1", "version": "v", "mode": "later"}, "mode"),
        ({"path": "seed1", "version": "v", "force": True}, "force"),
    ],
)
def test_invalid_swap_bodies_are_400(generator, body: dict[str, Any], fragment: str) -> None:
    assert_error(swap(generator, body), 400, fragment)


def test_swap_to_the_serving_version_with_other_weights_is_409(generator) -> None:
    current = generator.current_version()
    other = generator.other_dir()
    r = swap(generator, {"path": other.name, "version": current})
    assert_error(r, 409, "already serving", "new version")
    # The same version from the same place is a retried request: a no-op success.
    same = swap(generator, {"path": generator.current_dir().name, "version": current})
    assert same.status_code == 200 and same.json()["version"] == current


# --- generation request bodies -------------------------------------------------------------------

# At least one token per word: longer than the context whatever the tokenizer merges.
LONG_PROMPT = "word " * (MAX_MODEL_LEN + 1)


@pytest.mark.parametrize(
    ("route", "body", "status", "fragments"),
    [
        ("chat/completions", {"messages": CHAT, "n": 0}, 400, ["n"]),
        ("chat/completions", {"messages": CHAT, "n": MAX_N + 1}, 400, ["limit", str(MAX_N)]),
        ("chat/completions", {"messages": CHAT, "max_tokens": -1}, 400, ["max_tokens"]),
        (
            "chat/completions",
            {"messages": CHAT, "max_tokens": MAX_TOKENS_LIMIT + 1},
            400,
            ["limit"],
        ),
        ("chat/completions", {"messages": []}, 400, ["messages"]),
        ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, ["role"]),
        ("chat/completions", {"messages": [{"content": "hi"}]}, 400, ["role"]),
        ("chat/completions", {"messages": CHAT, "temperature": 3}, 400, ["temperature"]),
        ("chat/completions", {"messages": CHAT, "stop": [""]}, 400, ["stop"]),
        (
            "chat/completions",
            {"messages": CHAT, "min_tokens": 9, "max_tokens": 3},
            400,
            ["min_tokens"],
        ),
        ("chat/completions", {"messages": CHAT, "n": 2, "temperature": 0}, 400, ["greedy"]),
        ("chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, ["needs logprobs"]),
        (
            "chat/completions",
            {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
            400,
            ["top_logprobs"],
        ),
        ("completions", {"prompt": "hi", "logprobs": 99}, 400, ["logprobs"]),
        ("chat/completions", {"messages": CHAT, "model": "gpt-4"}, 404, ["gpt-4", "tiny-llama"]),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": LONG_PROMPT}]},
            400,
            ["context"],
        ),
        ("completions", {"prompt": []}, 400, ["prompt"]),
        ("completions", {"prompt": ""}, 400, ["prompt"]),
        ("completions", {"prompt": "hi", "max_tokens": 0}, 400, ["max_tokens"]),
        ("completions", {"prompt": "hi", "top_p": 0}, 400, ["top_p"]),
        ("completions", {"prompt": ["hi"] * (MAX_BATCH_PROMPTS + 1)}, 400, ["split"]),
        ("batch/chat", {"conversations": []}, 400, ["conversations"]),
        ("batch/chat", {"conversations": [[]]}, 400, ["at least one message"]),
        ("batch/chat", {"conversations": [CHAT], "ids": ["a", "b"]}, 400, ["ids"]),
    ],
)
def test_invalid_generation_bodies_are_4xx_with_a_message(
    generator, route: str, body: dict[str, Any], status: int, fragments: list[str]
) -> None:
    r = httpx.post(f"{generator.base_url}/v1/{route}", json=body, timeout=30)
    assert_error(r, status, *fragments)


def test_non_json_and_oversized_bodies(generator) -> None:
    url = f"{generator.base_url}/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "not valid JSON")
    r = httpx.post(url, content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400
    big = {"messages": [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 10)}]}
    assert_error(httpx.post(url, json=big, timeout=30), 413, "larger than")
    assert_error(httpx.get(f"{generator.base_url}/v1/nothing-here"), 404, "not found")
    r = httpx.get(url)
    assert r.status_code == 405 and "error" in r.json()

"""The run config: one YAML file drives a whole iterative-DPO run, like an alignment-handbook recipe.

    pairloop run configs/demo.yaml

Validated on load; a bad field is named in the error with its YAML path (`sampling.temperature:
Input should be less than or equal to 2`). Defaults follow the Snorkel-Mistral-PairRM-DPO recipe:
3 iterations, 20,000 fresh UltraFeedback prompts per iteration, 5 samples per prompt, PairRM full
ranking, best vs worst pairs with ties dropped, Zephyr DPO hyperparameters. Secrets (the generator's
admin token) never live here: they come from the orchestrator's settings (environment).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pairloop.jobs import TRAIN_QUEUE, DPOHyperparameters, LoraSettings
from pairloop.validation import describe_validation_error

__all__ = [
    "DEFAULT_JUDGE_MODEL",
    "ConfigError",
    "EvalPromptsConfig",
    "EvaluationConfig",
    "LocalConfig",
    "LocalJudgeConfig",
    "LocalRankerConfig",
    "LocalServiceConfig",
    "LocalTrainerConfig",
    "PairsConfig",
    "PromptsConfig",
    "PushToHubConfig",
    "RankerConfig",
    "RunConfig",
    "SamplingConfig",
    "ServicesConfig",
    "apply_overrides",
    "check_paths",
    "config_fingerprint",
    "load_run_config",
    "looks_like_hub_id",
]


_LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet"}
# The recipe's judge (compose, k8s, `local.judge`): a reward model trained on other preference
# data than PairRM, which picks best-of-n (docs/deploy.md "The judge").
DEFAULT_JUDGE_MODEL = "Skywork/Skywork-Reward-V2-Qwen3-0.6B"
HUB_DIR = "hub"  # MODEL_STORE/hub/ORG/NAME: base models named by their hub id
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_hub_id(value: str) -> bool:
    """`org/name`: one slash, no leading `.` or `/`, no `..` (a relative folder has other forms)."""
    return bool(_HUB_ID.match(value)) and ".." not in value


class ConfigError(ValueError):
    """The run config cannot be used; the message names every bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptsConfig(_Strict):
    """Where prompts come from and how they are sliced: disjoint, seeded, per iteration."""

    source: str = Field(
        "HuggingFaceH4/ultrafeedback_binarized",
        description="a Hugging Face dataset name, or a local .jsonl/.json/.parquet file",
    )
    split: str = Field("train_prefs", description="dataset split (hub datasets only)")
    field: str = Field("prompt", description="column holding the instruction text")
    id_field: str | None = Field(
        "prompt_id", description="column with a stable id; None: hashed text"
    )
    per_iteration: int = Field(20_000, ge=1)
    eval_prompts: int = Field(
        200, ge=1, description="held-out prompts, disjoint from every iteration"
    )
    seed: int = 42
    too_long: Literal["skip", "truncate"] = Field(
        "skip",
        description="prompts that cannot fit the generator's context next to sampling.max_tokens: "
        "skip them (a replacement is drawn from the pool) or truncate them to fit",
    )
    enforce_max_prompt_length: bool = Field(
        False,
        description="also treat dpo.max_prompt_length as a limit; by default prompts above it are "
        "admitted and the trainer truncates them, as TRL's max_prompt_length did (counted)",
    )


class SamplingConfig(_Strict):
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    seed: int = Field(0, description="base seed; each prompt gets its own derived seed")
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="the generator's context (prompt + completion tokens), when its "
        "--max-model-len caps the model's own; default: the base model's max_position_embeddings",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="the dtype the generator must serve the policy in (its --dtype); auto: the "
        "base checkpoint's own, the generator's default. Checked before any work",
    )
    max_failed_share: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="share of a generation's prompts (training or evaluation) the generator may "
        "fail to answer before the stage stops; the failures are counted either way",
    )


class RankerConfig(_Strict):
    mode: Literal["full", "bubble"] = "full"
    batch_prompts: int = Field(32, ge=1, description="prompts per /v1/rank call")


class PairsConfig(_Strict):
    """chosen = best, rejected = worst by ranker score; ties (best == worst) are dropped."""

    rule: Literal["best_vs_worst", "length_penalised"] = "best_vs_worst"
    length_penalty: float = Field(
        0.0, ge=0.0, description="length_penalised: score - penalty * (characters / 100)"
    )
    min_margin: float = Field(0.0, ge=0.0, description="drop pairs whose score gap is <= this")
    test_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="share of pairs in test_iteration_k"
    )

    @model_validator(mode="after")
    def _penalty(self) -> PairsConfig:
        if self.rule == "length_penalised" and self.length_penalty <= 0:
            raise ValueError("rule length_penalised needs length_penalty > 0")
        return self


class EvalPromptsConfig(_Strict):
    """The evaluation's own instructions: a hub dataset or a local file, used whole, in order.

    The recipe's is AlpacaEval 2.0 (`tatsu-lab/alpaca_eval`, config `alpaca_eval`, split `eval`,
    column `instruction`); a local JSON/JSONL in AlpacaEval's format (a list of objects with
    `instruction`, optionally `dataset`) works the same way. Every one of these instructions is
    removed from the training pool (compared case- and whitespace-insensitively).
    """

    source: str = Field(
        "tatsu-lab/alpaca_eval",
        description="a Hugging Face dataset name, or a local .jsonl/.json/.parquet file",
    )
    name: str | None = Field("alpaca_eval", description="dataset config name (hub datasets only)")
    split: str = Field("eval", description="dataset split (hub datasets only)")
    field: str = Field("instruction", description="column holding the instruction text")
    id_field: str | None = Field(None, description="column with a stable id; None: hashed text")
    limit: int | None = Field(None, ge=1, description="use only the first N instructions")


class EvaluationConfig(_Strict):
    """Evaluation after every iteration: answers to the evaluation instructions, judged pairwise."""

    enabled: bool = True
    prompts: EvalPromptsConfig | None = Field(
        None,
        description="the evaluation's own instructions (AlpacaEval's in the recipe); None: "
        "prompts.eval_prompts prompts held out of the training source",
    )
    judge: str | None = Field(
        None,
        description="URL of the ranker service that judges (e.g. a reward model that did not "
        "make the pairs); None: the run's ranker",
    )
    best_of: list[int] = Field(
        default_factory=lambda: [1],
        min_length=1,
        description="1: one greedy answer; n > 1: n samples, the run's ranker picks one "
        "(the recipe reports best-of-16); each is its own row",
    )
    best_of_temperature: float = Field(
        0.7, gt=0.0, le=2.0, description="sampling temperature of best-of-n's samples"
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy, as AlpacaEval runs")
    max_tokens: int = Field(512, ge=1)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError("every best_of entry must be >= 1")
        if 1 not in v:
            raise ValueError("best_of must include 1 (the plain answer every figure is based on)")
        return sorted(set(v))

    @field_validator("judge")
    @classmethod
    def _judge(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/") if v else v


class ServicesConfig(_Strict):
    generator_urls: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000"],
        min_length=1,
        description="every generator replica; all are swapped, generation is spread over them",
    )
    generator_dns: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9.-]+:\d{1,5}$",
        description="HOST:PORT whose DNS records list every generator replica (a Kubernetes "
        "headless Service); resolved again before each swap, so scaled-up replicas are found. "
        "Replaces generator_urls when set.",
    )
    ranker_url: str = "http://127.0.0.1:8001"
    redis_url: str | None = Field(None, description="Celery broker; default PAIRLOOP_REDIS_URL")
    concurrency: int = Field(
        4,
        ge=1,
        description="generation/ranking calls in flight at once (ranking: at least 2 per ranker "
        "replica, as its /ready reports them)",
    )
    request_timeout_s: float = Field(1800.0, gt=0)
    retries: int = Field(5, ge=0, description="retries on connection errors and 5xx (never on 4xx)")
    train_timeout_s: float = Field(7 * 24 * 3600.0, gt=0)
    train_queue: str = Field(
        TRAIN_QUEUE,
        min_length=1,
        description="the Celery queue training jobs go to (the workers' --queue); the local "
        "stack uses one per run, so no other run's worker takes its jobs",
    )
    broker_outage_s: float = Field(
        120.0,
        gt=0,
        description="how long the Celery broker (Redis) may stay unreachable before the run "
        "fails; a restart or an outage shorter than this is waited out",
    )
    worker_absent_s: float = Field(
        300.0,
        gt=0,
        description="how long no trainer worker may consume the training queue (none started, "
        "all crashed) before the run fails; a worker restarted sooner (a restart policy, the "
        "local stack's supervisor) takes the job again and it resumes from its checkpoint",
    )

    @field_validator("generator_urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return [u.rstrip("/") for u in v]

    @field_validator("ranker_url")
    @classmethod
    def _ranker(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")


class LocalServiceConfig(_Strict):
    """Where one service of the local stack runs (`pairloop run CONFIG --local`)."""

    gpus: list[int] | None = Field(
        None,
        description="CUDA_VISIBLE_DEVICES for this service's processes; [] hides every GPU; "
        "null: inherit the environment's",
    )
    port: int | None = Field(None, ge=1, le=65535, description="null: a free loopback port")
    args: list[str] = Field(
        default_factory=list,
        description="extra flags for `python -m services.<name>` (see its --help)",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="extra environment variables for its processes"
    )


class LocalRankerConfig(LocalServiceConfig):
    backend: str = Field("pairrm", description="pairrm | reward-model | scorer | module:factory")
    model: str = Field(
        "llm-blender/PairRM", description="checkpoint or hub name; scorer: package.module:function"
    )
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:N")


class LocalJudgeConfig(LocalRankerConfig):
    """A second ranker process that judges the evaluations (`evaluation.judge` of a --local run)."""

    backend: str = Field(
        "reward-model", description="reward-model (default) | pairrm | scorer | module:factory"
    )
    model: str = Field(
        DEFAULT_JUDGE_MODEL,
        description="checkpoint or hub name of the judge: not the model that picks best-of-n",
    )


class LocalTrainerConfig(LocalServiceConfig):
    device: Literal["auto", "cpu", "cuda"] = "auto"


class LocalConfig(_Strict):
    """The local stack: what `--local` starts beyond the loop's fields (never changes results)."""

    redis: str = Field(
        "auto",
        description="auto: the Redis that PAIRLOOP_REDIS_URL or services.redis_url names, if set "
        "and answering, else a private redis-server with a password; private: always a private "
        "one (in RUN_DIR/local); or a redis:// URL",
    )
    cpu_threads: int = Field(
        1, ge=1, description="OMP/MKL/torch threads per service process on CPU"
    )
    startup_timeout_s: float = Field(600.0, gt=0, description="per service, to become ready")
    generator: LocalServiceConfig = Field(default_factory=LocalServiceConfig)
    ranker: LocalRankerConfig = Field(default_factory=LocalRankerConfig)
    judge: LocalJudgeConfig | None = Field(
        None,
        description="a second ranker process as the evaluations' judge (replaces "
        "evaluation.judge in --local runs); null: none, evaluation.judge as written",
    )
    trainer: LocalTrainerConfig = Field(default_factory=LocalTrainerConfig)

    @field_validator("redis")
    @classmethod
    def _redis(cls, v: str) -> str:
        if v not in ("auto", "private") and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be auto, private or a redis:// URL")
        return v


class PushToHubConfig(_Strict):
    """Opt-in upload of the final policy (with its model card) and the datasets to the hub."""

    model_id: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="org/name of the model repo")
    dataset_id: str | None = Field(
        None, pattern=r"^[\w.-]+/[\w.-]+$", description="org/name of the dataset repo; None: none"
    )
    private: bool = Field(True, description="create the repos private")


class RunConfig(_Strict):
    """Everything one run needs. Paths are relative to the config file's directory."""

    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="default: config name + timestamp",
    )
    base_model: str = Field(
        description="base policy: a directory inside model_store, or a hub id (org/name), "
        "downloaded into MODEL_STORE/hub/org/name when the run is created"
    )
    model_store: str = Field(description="the store shared with generator and trainer")
    iterations: int = Field(3, ge=1, le=100)
    samples_per_prompt: int = Field(5, ge=2)
    shard_size: int = Field(
        64, ge=1, description="prompts per generation/ranking shard (resume unit)"
    )
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    ranker: RankerConfig = Field(default_factory=RankerConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    reference: Literal["base", "previous"] = Field(
        "base", description="DPO reference: the base model, or the previous iteration's policy"
    )
    dpo: DPOHyperparameters = Field(default_factory=DPOHyperparameters)
    lora: LoraSettings | None = None
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    placement: Literal["dedicated", "time_shared"] = Field(
        "dedicated",
        description="dedicated: generator and trainer keep GPUs of their own, the generator "
        "swaps weights in place; time_shared: one node, every GPU in every phase: the generator "
        "releases its GPU memory before training and wakes onto the new policy after it",
    )
    services: ServicesConfig = Field(default_factory=ServicesConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    push_to_hub: PushToHubConfig | None = Field(
        None, description="upload the final policy and the datasets at the end (HF_TOKEN)"
    )

    def fingerprint(self) -> str:
        """Hash of everything that changes results (a resumed run must keep the same config).

        Where the services run (`services`, `local`, `placement`) is not part of it: a run may
        resume on another stack.
        """
        return config_fingerprint(self.model_dump(mode="json"))


# Where the services run: a run may resume on another stack.
_NOT_FINGERPRINTED = ("services", "local", "placement", "push_to_hub")


def config_fingerprint(frozen: dict[str, Any]) -> str:
    """The fingerprint of a run config as frozen in its file (`RunConfig.model_dump(mode="json")`).

    Taken over the file's own keys, not over a model that fills in defaults: a field that a
    later pairloop adds is absent from an older run's file, and that is not an edit.
    """
    payload = {k: v for k, v in frozen.items() if k not in _NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _absolutise(cfg: RunConfig, base_dir: Path) -> RunConfig:
    def fix(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base_dir / path).resolve())

    store = fix(cfg.model_store)
    base = Path(cfg.base_model).expanduser()
    if base.is_absolute():
        base_model = str(base)
    elif (
        looks_like_hub_id(cfg.base_model)
        and Path(store).is_dir()
        and not (Path(store) / base.parts[0]).exists()
    ):
        # A hub id (`org/name`, no `org` folder in the store): it lives, once fetched
        # (orchestrator.hub), in MODEL_STORE/hub/org/name.
        base_model = str(Path(store) / HUB_DIR / cfg.base_model)
    else:
        base_model = str((Path(store) / base).resolve())
    prompts = cfg.prompts
    src = Path(prompts.source).expanduser()
    if src.suffix in {".jsonl", ".json", ".parquet"}:
        prompts = prompts.model_copy(update={"source": fix(prompts.source)})
    evaluation = cfg.evaluation
    ep = evaluation.prompts
    if ep is not None and Path(ep.source).expanduser().suffix in _LOCAL_SUFFIXES:
        evaluation = evaluation.model_copy(
            update={"prompts": ep.model_copy(update={"source": fix(ep.source)})}
        )
    return cfg.model_copy(
        update={
            "model_store": store,
            "base_model": base_model,
            "prompts": prompts,
            "evaluation": evaluation,
        }
    )


def apply_overrides(raw: dict[str, object], overrides: Sequence[str]) -> dict[str, object]:
    """`raw` with each `dotted.field=VALUE` set (VALUE read as YAML: 0.05, true, [a, b], none).

    Like TRL's `--learning_rate 1e-6` on its script's command line; what comes out is validated
    as the file is, so a misspelt field or a bad value is named in the error.
    """
    out = copy.deepcopy(raw)
    for item in overrides:
        field, sep, text = item.partition("=")
        if not sep or not field.strip():
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set dpo.beta=0.05")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
        parts = field.strip().split(".")
        node: dict[str, object] = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {item!r}: {where} is not a section of fields")
            node = child
        node[parts[-1]] = value
    return out


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read and validate a YAML run config (with `--set` overrides); raise ConfigError naming
    each bad field."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read run config {file}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"run config {file} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"run config {file} must be a YAML mapping of fields")
    raw = apply_overrides(raw, overrides)
    try:
        cfg = RunConfig.model_validate(raw)
    except pydantic.ValidationError as exc:
        with_set = f" with --set {' '.join(overrides)}" if overrides else ""
        raise ConfigError(
            describe_validation_error(
                exc,
                title=f"invalid run config {file}{with_set}",
                unknown_field_hint="check the spelling; see configs/*.yaml for the schema",
            )
        ) from None
    return _absolutise(cfg, file.resolve().parent)


def check_paths(cfg: RunConfig) -> None:
    """Fail before any work when the store, the base model or a local prompt file is missing."""
    store = Path(cfg.model_store)
    problems = []
    if not store.is_dir():
        problems.append(
            f"model_store: {store} is not a directory; create it (the store the generator and "
            "trainer share) and put the base model in it: `hf download ORG/NAME --local-dir "
            f"{store}/models/NAME` (README: Running the real recipe), or give base_model a hub id"
        )
    base = Path(cfg.base_model)
    if not (base / "config.json").is_file():
        problems.append(
            f"base_model: {base} has no config.json (a Hugging Face model directory); download "
            "the model there (`hf download ORG/NAME --local-dir DIR`) or give its hub id"
        )
    elif store.is_dir() and store.resolve() not in base.resolve().parents:
        problems.append(
            f"base_model: {base} must be inside model_store {store} (the generator swaps from there)"
        )
    src = Path(cfg.prompts.source)
    if src.suffix in {".jsonl", ".json", ".parquet"} and not src.is_file():
        problems.append(f"prompts.source: {src} does not exist")
    ep = cfg.evaluation.prompts
    if (
        ep is not None
        and Path(ep.source).suffix in _LOCAL_SUFFIXES
        and not Path(ep.source).is_file()
    ):
        problems.append(f"evaluation.prompts.source: {ep.source} does not exist")
    if cfg.shard_size > cfg.prompts.per_iteration:
        problems.append("shard_size: larger than prompts.per_iteration")
    if problems:
        raise ConfigError("invalid run config:\n  " + "\n  ".join(problems))

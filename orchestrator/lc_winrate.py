"""AlpacaEval 2.0's length-controlled (LC) win rate, computed by the `alpaca-eval` package itself.

    lc = length_controlled(annotations, glm="length_controlled_v1")

`annotations` are AlpacaEval's: one dict per instruction with `instruction`, `output_1` (the
reference's answer), `output_2` (the policy's), `generator_1`, `generator_2` and `preference` in
[1, 2] (2: output_2 wins; 1.5: a tie). AlpacaEval's GLM fits

    logit P(output_2 wins) = b_len * tanh(delta_len / sd(delta_len)) [+ instruction terms] + b0

and reports the mean predicted preference at delta_len = 0: the win rate the policy would have if
its answers were as long as the reference's. Two of the package's GLMs are used:

- `length_controlled_v1`, AlpacaEval 2.0's leaderboard LC: adds AlpacaEval's per-instruction
  difficulty and regularises toward its "gamed" baselines. Both come from `df_gamed.csv` on the hub
  and are keyed by AlpacaEval's instruction index, so it is meaningful only on AlpacaEval's own
  instructions; here the package's `get_length_controlled_winrate` runs unchanged.
- `length_controlled_minimal`: the same length term and intercept, nothing instruction-specific,
  valid on any instruction set and offline. The package's entry point would still download
  `df_gamed.csv` (for columns this formula never reads), so the design matrix is built here the
  way `glm_winrate._get_featurized_data` builds it, and fitted by the package's own
  `make_dmatrix_for_model` and `fit_LogisticRegressionCV` (tests compare the two).

The leaderboard GLM's intercept, length term and instruction difficulties are GPT-4 Turbo's
judgements against `gpt4_1106_preview`: `choose_glm` picks it only for annotations by AlpacaEval's
own annotator against that reference, on AlpacaEval's instructions (a user importing AlpacaEval's
annotations); any other judge or reference gets the minimal GLM. A `length_controlled_v1` that
cannot fetch its hub file falls back to the minimal GLM and says so (`note`). The minimal GLM
predicts one value for every instruction, so it has no standard error (None, not 0).
The package is imported lazily (it takes seconds and pulls scikit-learn).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ALPACA_EVAL_ANNOTATORS",
    "ALPACA_EVAL_REFERENCE",
    "GLM",
    "LENGTH_TERM",
    "LengthControlled",
    "choose_glm",
    "length_controlled",
]

GLM = Literal["length_controlled_v1", "length_controlled_minimal"]
LENGTH_TERM = "np.tanh(std_delta_len)"  # the GLM's column name for the length term
# GroupKFold(n_splits=5) inside the package needs at least 5 distinct instructions.
_MIN_ANNOTATIONS = 5
# AlpacaEval 2.0's reference generator and its annotators (the leaderboard's judge and its
# GPT-4 Turbo variants): the only judgements the leaderboard GLM was fitted on.
ALPACA_EVAL_REFERENCE = "gpt4_1106_preview"
ALPACA_EVAL_ANNOTATORS = frozenset(
    {"weighted_alpaca_eval_gpt4_turbo", "alpaca_eval_gpt4_turbo_fn", "alpaca_eval_clf_gpt4_turbo"}
)


def choose_glm(annotations: Sequence[dict[str, Any]]) -> GLM:
    """`length_controlled_v1` only for AlpacaEval's own judge and reference on its instructions
    (every annotation: `annotator`, `generator_1`, an `index`); else `length_controlled_minimal`."""
    own = bool(annotations) and all(
        a.get("annotator") in ALPACA_EVAL_ANNOTATORS
        and a.get("generator_1") == ALPACA_EVAL_REFERENCE
        and a.get("index") is not None
        for a in annotations
    )
    return "length_controlled_v1" if own else "length_controlled_minimal"


@dataclass(frozen=True)
class LengthControlled:
    """The LC win rate in [0, 1] (None where it cannot be fitted), and which GLM produced it."""

    win_rate: float | None
    standard_error: float | None
    length_coef: float | None
    glm: str
    note: str | None = None


def _glm_winrate() -> Any:
    """The package's GLM module (imported lazily: seconds, and scikit-learn)."""
    from alpaca_eval.metrics import glm_winrate

    return glm_winrate


def _pandas() -> Any:
    import pandas

    return pandas


def _frame(annotations: Sequence[dict[str, Any]]) -> Any:
    df = _pandas().DataFrame(list(annotations))
    if "index" in df.columns:  # AlpacaEval's instruction index: the GLM's row key
        df = df.set_index(df["index"].astype(int)).drop(columns=["index"])
    return df


def _v1(annotations: Sequence[dict[str, Any]]) -> LengthControlled:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = _glm_winrate().get_length_controlled_winrate(
            _frame(annotations),
            glm_name="length_controlled_v1",
            save_weights_dir=tmp,
            is_add_glm_preference_inplace=False,
            is_warn_extreme_changes=False,
        )
        (weights_file,) = Path(tmp, "length_controlled_v1").glob("*.csv")
        weights = _pandas().read_csv(weights_file, index_col=0)
    return LengthControlled(
        win_rate=float(metrics["length_controlled_winrate"]) / 100,
        standard_error=float(metrics["lc_standard_error"]) / 100,
        length_coef=float(weights[LENGTH_TERM].iloc[-1]),
        glm="length_controlled_v1",
    )


def _minimal(annotations: Sequence[dict[str, Any]], note: str | None) -> LengthControlled:
    glm = _glm_winrate()
    info = glm.GLM_INFO["length_controlled_minimal"]
    df = _frame(annotations).reset_index(drop=True)
    # As glm_winrate._get_featurized_data, steps 2 and 3, without the hub's instruction data.
    delta = df["output_1"].str.len() - df["output_2"].str.len()
    data = df[["preference"]].copy()
    data["std_delta_len"] = delta / delta.std()
    data["preference"] = data["preference"].astype(float).replace({0.0: 1.5}) - 1
    data["not_gamed_baseline"] = True
    test = data[["not_gamed_baseline"]].copy()
    test["std_delta_len"] = 0
    train, x_test = glm.make_dmatrix_for_model(data, test, formula=info["formula"])
    train = train[train["preference"].notna()]
    model = glm.fit_LogisticRegressionCV(
        train, "preference", is_ytrue_proba=True, sample_weight=None, **info["kwargs"]
    )
    predicted = model.predict_proba(x_test)[:, 1]
    weights = dict(zip(x_test.columns, model.coef_[0], strict=True))
    return LengthControlled(
        win_rate=float(predicted.mean()),
        # One prediction for every instruction (nothing instruction-specific): the package's
        # standard error of their mean is 0 by construction, not a measured uncertainty.
        standard_error=None,
        length_coef=float(weights[LENGTH_TERM]),
        glm="length_controlled_minimal",
        note=note,
    )


def length_controlled(
    annotations: Sequence[dict[str, Any]], *, glm: GLM | None = None
) -> LengthControlled:
    """AlpacaEval's LC win rate of `generator_2` over `generator_1` on these annotations;
    `glm` None: `choose_glm(annotations)`."""
    glm = glm or choose_glm(annotations)
    if len(annotations) < _MIN_ANNOTATIONS:
        return LengthControlled(
            None, None, None, glm, f"needs at least {_MIN_ANNOTATIONS} annotations"
        )
    lengths = {(len(a["output_1"]) - len(a["output_2"])) for a in annotations}
    if len(lengths) == 1:
        # No length difference to control for; the GLM's length column would be 0/0.
        return LengthControlled(None, None, None, glm, "every length difference is the same")
    with warnings.catch_warnings():
        # scikit-learn 1.9 warns about arguments the package passes (penalty, l1_ratios).
        warnings.simplefilter("ignore", FutureWarning)
        if glm == "length_controlled_v1":
            try:
                return _v1(annotations)
            except OSError as exc:  # hub unreachable: no df_gamed.csv
                return _minimal(
                    annotations,
                    f"length_controlled_v1 needs AlpacaEval's df_gamed.csv from the hub ({exc}); "
                    "fell back to length_controlled_minimal",
                )
        return _minimal(annotations, None)

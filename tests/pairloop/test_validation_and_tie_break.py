"""The shared helpers two or more parts lean on: the tie-break rule and the validation formatter."""

from __future__ import annotations

import pydantic
import pytest
from pydantic import BaseModel, ConfigDict

from pairloop.contracts.ranker import best_and_worst
from pairloop.validation import describe_validation_error, field_errors


def test_best_and_worst_take_the_first_of_equal_scores() -> None:
    assert best_and_worst([0.1, 0.9, 0.9, -0.5, -0.5]) == (1, 3)
    assert best_and_worst([0.3, 0.3, 0.3]) == (0, 0)  # a tie: no pair
    with pytest.raises(ValueError, match="at least one"):
        best_and_worst([])


class Inner(BaseModel):
    max_model_len: int


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Inner
    name: str


def errors_of(data: object) -> pydantic.ValidationError:
    with pytest.raises(pydantic.ValidationError) as info:
        Outer.model_validate(data)
    return info.value


def test_each_bad_field_is_named_as_the_user_wrote_it() -> None:
    exc = errors_of({"inner": {"max_model_len": "x"}, "nmae": "a"})
    dotted = describe_validation_error(exc, title="invalid thing", unknown_field_hint="see docs")
    assert dotted.splitlines() == [
        "invalid thing:",
        "  inner.max_model_len: Input should be a valid integer, unable to parse string as an "
        "integer",
        "  name: Field required",
        "  nmae: unknown field (see docs)",
    ]
    flags = [e.where for e in field_errors(exc, naming="flag")]
    assert flags == ["--inner.max-model-len", "--name", "--nmae"]
    assert field_errors(errors_of([1]), root="(root)")[0].where == "(root)"


def test_a_location_prefix_can_be_dropped() -> None:
    raw = [{"type": "missing", "loc": ("body", "items"), "msg": "Field required"}]
    assert field_errors(raw, drop_prefix=("body",))[0].where == "items"

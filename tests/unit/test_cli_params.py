"""The CLI's shared option types."""

from __future__ import annotations

import click
import pytest

from gateway.cli.params import FiniteFloatRange


@pytest.mark.parametrize("text", ["nan", "NaN", "-nan", "inf", "-inf", "1e999"])
def test_finite_float_range_refuses_what_is_not_a_finite_number(text: str) -> None:
    with pytest.raises(click.BadParameter, match="is not a finite number"):
        FiniteFloatRange().convert(text, None, None)  # type: ignore[arg-type]


def test_finite_float_range_keeps_its_bounds() -> None:
    bounded = FiniteFloatRange(0, 60)
    assert bounded.convert("0.3", None, None) == 0.3  # type: ignore[arg-type]
    with pytest.raises(click.BadParameter, match="is not in the range 0<=x<=60"):
        bounded.convert("61", None, None)  # type: ignore[arg-type]
    with pytest.raises(click.BadParameter, match="is not a finite number"):
        bounded.convert("nan", None, None)  # type: ignore[arg-type]

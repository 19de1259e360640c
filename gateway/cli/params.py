"""Option types shared by the CLI's commands."""

from __future__ import annotations

import math
from pathlib import Path

import click


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and infinities.

    NaN compares false with both bounds, so ``FloatRange`` lets it through, and it fails later
    far from the option (``socket.settimeout`` raises on it); an unbounded range would take
    ``inf`` too. Use this for every float option.
    """

    def convert(
        self, value: float, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        # ``value`` is the option's text as given (click's stubs type it as the result)
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


#: ``--config``, for the commands that read gateway.toml and its partners
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("gateway.toml"),
    show_default=True,
    help="gateway.toml (partners are read from its partners_dir).",
)

__all__ = ["FiniteFloatRange", "config_option"]

"""argparse value types shared by the command lines: a bad value is one clear line."""

from __future__ import annotations

import argparse

from adadiff.config import SEED_LIMIT


def _whole(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None


def positive(value: str) -> int:
    n = _whole(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {n}")
    return n


def non_negative(value: str) -> int:
    n = _whole(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {n}")
    return n


def positive_list(value: str) -> tuple[int, ...]:
    """Comma-separated whole numbers >= 1, e.g. ``200,100,50``."""
    parts = [part.strip() for part in value.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {value!r}")
    return tuple(positive(part) for part in parts)


def noise_seed(value: str) -> int:
    n = non_negative(value)
    if n >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a seed below 2**32 = {SEED_LIMIT}, got {n}")
    return n


def fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {x}")
    return x


def _number(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return x


def positive_float(value: str) -> float:
    x = _number(value)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {x:g}")
    return x


def non_negative_float(value: str) -> float:
    x = _number(value)
    if x < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {x:g}")
    return x


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless it is unset or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or "default" in text
        ):
            return action.help
        return f"{text} (default: %(default)s)".lstrip()

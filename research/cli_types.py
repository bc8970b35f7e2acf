"""argparse value types that refuse impossible numbers while the command line is parsed.

A bad value becomes a usage error (``error: argument --top-p: ...``, exit status 2) before any
run is loaded or compiled, instead of a failure deep inside sampling or a silent nonsense result.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(kind: type, test: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if isinstance(value, float) and math.isnan(value) or not test(value):
            raise argparse.ArgumentTypeError(f"{text} must be {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
unit_fraction = _number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")

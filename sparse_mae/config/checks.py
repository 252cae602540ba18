"""The validator kit at the bottom of the configs: `opt` declares a schema field with its
default, its help line and its check; the checks say what a value must be (`problem`), and
config.validate applies them to a composed config. Imports nothing of the project."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, is_dataclass
from enum import Enum
from typing import Any, Optional


def opt(default: Any, help: str, check: Any = None) -> Any:  # noqa: A002 - `help` reads best at the call sites
    """A schema field with its default, the help line `--help` prints for it and, where the
    type alone does not say it, the range `validate` checks."""
    metadata = {"help": help, "check": check}
    if isinstance(default, (list, dict)) or is_dataclass(default):
        value = default
        return field(default_factory=lambda: _copy(value), metadata=metadata)
    return field(default=default, metadata=metadata)


def _copy(value):
    return copy.deepcopy(value)


class Choice(str, Enum):
    """A closed set of strings: Hydra rejects anything else and names the valid ones."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class Range:
    """A number within bounds, declared on a schema field. For a list field every element
    is checked, and `length` / `nonempty` / `ascending` constrain the list. None passes:
    whether a field may be null is its type's business, which Hydra checks."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    multiple_of: Optional[int] = None
    length: Optional[int] = None
    nonempty: bool = False
    ascending: bool = False
    hint: str = ""  # appended to the error, e.g. what the paper uses

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = "a number"
        if self.multiple_of:
            text += f" and a multiple of {self.multiple_of}"
        return text

    def _fits(self, x) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        if self.high is not None and (x >= self.high if self.high_open else x > self.high):
            return False
        return not self.multiple_of or x % self.multiple_of == 0

    def problem(self, value: Any) -> Optional[str]:
        """None if `value` fits, else what it must be."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            what = f"a list of {self.length} numbers" if self.length else "a list of numbers"
            shape_ok = (self.length is None or len(value) == self.length) and (value or not self.nonempty)
            order_ok = not self.ascending or all(a <= b for a, b in zip(value, value[1:]))
            if shape_ok and order_ok and all(self._fits(x) for x in value):
                return None
            return (f"{'a non-empty list' if self.nonempty and not self.length else what}, each {self.describe()}"
                    + (", in ascending order (min, max)" if self.ascending else ""))
        return None if self._fits(value) else self.describe()


@dataclass(frozen=True)
class OneOf:
    """A string among a few words (case-insensitive), for fields that Hydra must keep as
    strings because `true`/`false` are among them."""

    words: tuple[str, ...]

    def problem(self, value: Any) -> Optional[str]:
        return None if str(value).lower() in self.words else f"one of {', '.join(self.words)}"


@dataclass(frozen=True)
class NonEmpty:
    """A list with at least one entry (the entries' own type is Hydra's to check)."""

    def problem(self, value: Any) -> Optional[str]:
        return None if value is None or len(value) else "a non-empty list"


@dataclass(frozen=True)
class SizePairs:
    """A non-empty list of [width, height] pairs of positive integers."""

    def problem(self, value: Any) -> Optional[str]:
        ok = value and all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p)
                           for p in value)
        return None if ok else "a non-empty list of [width, height] pairs, each > 0"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)
AREA_RANGE = Range(0, 1, low_open=True, length=2, ascending=True)
MASK_RATIO = Range(0, 1, low_open=True, high_open=True, hint="the paper uses 0.6")

"""A small declarative parameter checker (sklearn's own is private API) and input checks.

Constraints are a dict ``{param_name: [constraint, ...]}``; a value is valid when it meets any
constraint of its list. A constraint is ``None`` (the value may be None), a type (or tuple of
types), an :class:`Interval`, an :class:`Options` or a callable returning bool (give it a
``description`` attribute for the message).
"""

from __future__ import annotations

import difflib
import numbers
from dataclasses import dataclass

import numpy as np

from .exceptions import InvalidParameterError


@dataclass(frozen=True)
class Interval:
    """Numbers of ``kind`` (``numbers.Integral`` or ``numbers.Real``) in a range."""

    kind: type
    left: float | None
    right: float | None
    closed: str = "both"  # "both", "left", "right", "neither"

    def __call__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return False
        if self.kind is numbers.Real and isinstance(value, numbers.Integral) is False:
            if not np.isfinite(value):
                return False
        left_ok = self.left is None or (
            value >= self.left if self.closed in ("both", "left") else value > self.left
        )
        right_ok = self.right is None or (
            value <= self.right if self.closed in ("both", "right") else value < self.right
        )
        return left_ok and right_ok

    @property
    def description(self) -> str:
        kind = "an int" if self.kind is numbers.Integral else "a float"
        lo = "-inf" if self.left is None else repr(self.left)
        hi = "inf" if self.right is None else repr(self.right)
        lb = "[" if self.closed in ("both", "left") and self.left is not None else "("
        rb = "]" if self.closed in ("both", "right") and self.right is not None else ")"
        return f"{kind} in the range {lb}{lo}, {hi}{rb}"


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values (strings, usually)."""

    values: tuple

    def __call__(self, value) -> bool:
        return isinstance(value, str) and value in self.values

    @property
    def description(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class SubsetOf:
    """A non-empty list, tuple or set of distinct values of a fixed set."""

    values: tuple

    def __call__(self, value) -> bool:
        if not isinstance(value, (list, tuple, set, frozenset)) or not value:
            return False
        items = list(value)
        return all(isinstance(v, str) and v in self.values for v in items) and len(
            set(items)) == len(items)

    @property
    def description(self) -> str:
        return "a non-empty collection of " + ", ".join(repr(v) for v in self.values)


def _describe(constraint) -> str:
    if constraint is None:
        return "None"
    if isinstance(constraint, type):
        return f"an instance of {constraint.__name__}"
    if isinstance(constraint, tuple):
        return "an instance of " + " or ".join(t.__name__ for t in constraint)
    return getattr(constraint, "description", getattr(constraint, "__name__", str(constraint)))


def _meets(value, constraint) -> bool:
    if constraint is None:
        return value is None
    if isinstance(constraint, (type, tuple)):
        return isinstance(value, constraint)
    return bool(constraint(value))


#: Parameter values that met their owner's constraints: a fit's checks are per-fit constants
#: (≈ 20 µs of Python per estimator, more on the caches a large product leaves cold). Only
#: plain values are kept (:func:`_plain`): an object (a model, a process group, a cache) is
#: checked every time, so the set never keeps one alive or trusts its changed state.
_MET: set = set()
_MET_SIZE = 4096
_PLAIN_TYPES = (bool, int, float, str, type(None))


def _plain(value) -> bool:
    """A value of a built-in immutable type, or a tuple/frozenset of such values."""
    if type(value) in (tuple, frozenset):
        return all(type(item) in _PLAIN_TYPES for item in value)
    return type(value) in _PLAIN_TYPES


def check_params(params: dict, constraints: dict, owner: str) -> None:
    """Raise InvalidParameterError naming every parameter that meets none of its constraints.

    A plain value (a number, string, None, or a tuple of those) that met them once (the same
    owner, parameter, type and value) is not checked again.

    >>> check_params({"rank": 0}, {"rank": [Interval(numbers.Integral, 1, None)]}, "ID")
    Traceback (most recent call last):
    ...
    skid.exceptions.InvalidParameterError: ID: the 'rank' parameter must be an int in the ...
    """
    errors = []
    for name, allowed in constraints.items():
        value = params.get(name)
        key = (owner, name, type(value), value) if _plain(value) else None
        if key is not None and key in _MET:  # met before: the same type and value
            continue
        if any(_meets(value, c) for c in allowed):
            if key is not None and len(_MET) < _MET_SIZE:
                _MET.add(key)
            continue
        wanted = " or ".join(_describe(c) for c in allowed)
        errors.append(f"the {name!r} parameter must be {wanted}; got {value!r}")
    if errors:
        raise InvalidParameterError(f"{owner}: " + "; ".join(errors) + ".")


def nearest_names(name: str, choices, n: int = 8) -> str:
    """A hint naming the ``n`` valid names most like ``name`` (a did-you-mean when one is
    close), in their given order: for an unknown module name among many."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    if not choices:
        return ""
    score = {c: difflib.SequenceMatcher(None, name, c).ratio() for c in choices}
    nearest = set(sorted(choices, key=lambda c: -score[c])[:n])
    listed = ", ".join(repr(c) for c in choices if c in nearest)
    more = f" (of {len(choices)})" if len(choices) > n else ""
    return f"; the names nearest it{more}: {listed}"


def suggest(name: str, choices) -> str:
    """A 'did you mean ...?' hint for a misspelled name, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""

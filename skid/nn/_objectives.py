"""Objectives and calibrations: small objects, one registry each.

An :class:`Objective` says what the kept channels must reconstruct: it turns a unit's
statistics into the factorization its widths and selection are read from. A
:class:`Calibration` says which model the statistics come from and what ``T`` is fitted to:
it gives one unit's selection from a statistics source (one pass or block replay) through the
planner. ``NetworkCompressor(objective=..., calibration=...)`` takes a registered name or an
instance, so a variant (another pivot rule) is a parameter, and a new objective or
calibration is one new class here or in the caller's code (see the user guide, "Extending
skid").
"""

from __future__ import annotations

from dataclasses import dataclass

from .._corrective import SELECTIONS
from ._unit_kinds import unit_kind

__all__ = [
    "ActivationsObjective",
    "Calibration",
    "CorrectiveCalibration",
    "Objective",
    "OriginalCalibration",
    "OutputsObjective",
    "SequentialCalibration",
    "calibration_for",
    "objective_for",
    "register_calibration",
    "register_objective",
]


# ---------------------------------------------------------------------------------- objectives


class Objective:
    """What the kept channels of a unit must reconstruct.

    Subclasses override :meth:`factorization` (statistics of the model being calibrated) and,
    to work with ``calibration="corrective"``, :meth:`corrective_factorization`. The
    factorization's ``errors`` decide ``tol`` widths and the FLOP budget, its ``select(k)``
    gives the kept channels and ``T``.
    """

    def factorization(self, work, unit, fac):
        """``fac`` (the unit's factorization of its consumers' input) for this objective.

        Returns None where the objective does not apply to the unit: it then keeps ``fac``
        (a warning names it).
        """
        return fac

    def corrective_factorization(self, work, unit, stats, selection: str):
        """The corrective factorization of ``stats`` (:class:`skid._corrective.
        CrossStatistics`: the compressed model's input against the original's)."""
        return unit_kind(unit).corrective_factorization(stats, unit, selection)


@dataclass(frozen=True)
class ActivationsObjective(Objective):
    """The paper's objective: reconstruct the consumer's input ``Z``."""


@dataclass(frozen=True)
class OutputsObjective(Objective):
    """Reconstruct what the consumer computes, ``Z Wᵀ``: pivots weighted by its weights.

    Parameters
    ----------
    pivots : {"scaled", "greedy"}, default="scaled"
        ``"scaled"``: columns scaled by the norms of the consumer weights that read them (on
        MiniLM at half FFN width it kept more than the greedy, for a sixth of the time:
        ``benchmarks/bench_transformers.py``); ``"greedy"``: each pivot the channel that
        removes the most output error (:func:`skid._linalg.factorize_for_outputs`).
    """

    pivots: str = "scaled"

    def __post_init__(self):
        if self.pivots not in ("scaled", "greedy"):
            raise ValueError(f"pivots must be 'scaled' or 'greedy'; got {self.pivots!r}.")

    def factorization(self, work, unit, fac):
        return unit_kind(unit).for_outputs(work, unit, fac, self.pivots)

    def corrective_factorization(self, work, unit, stats, selection):
        if self.pivots != "scaled":
            raise ValueError(f"OutputsObjective(pivots={self.pivots!r}) has no corrective "
                             "form: use pivots='scaled' with calibration='corrective'.")
        return unit_kind(unit).corrective_for_outputs(work, unit, stats, self.pivots)


_OBJECTIVES: dict[str, Objective] = {
    "activations": ActivationsObjective(),
    "outputs": OutputsObjective(),
}


def register_objective(name: str, objective: Objective) -> None:
    """Make ``objective=name`` mean ``objective``."""
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be an Objective; got {type(objective).__name__}.")
    _OBJECTIVES[name] = objective


def objective_for(spec) -> Objective:
    """The objective a parameter value names (an :class:`Objective` stands for itself)."""
    return _lookup(spec, _OBJECTIVES, Objective, "objective")


def objective_names() -> tuple:
    return tuple(_OBJECTIVES)


# -------------------------------------------------------------------------------- calibrations


class Calibration:
    """Which model a unit's statistics come from, and what its ``T`` is fitted to.

    Attributes
    ----------
    follows_compression : bool
        Units are calibrated in forward order, each on the model compressed so far (folded
        before the next one is calibrated); False: every unit from the original model, in
        one pass.
    needs_reference : bool
        The original model must run beside the compressed one.
    """

    follows_compression = True
    needs_reference = False

    def unit_selection(self, planner, source, unit, k, key):
        """``unit``'s selection at width ``k`` (None: the fit's width rule) from ``source``
        (a :class:`skid.nn._planner.StatisticsSource`), through ``planner``'s rules."""
        raise NotImplementedError


@dataclass(frozen=True)
class OriginalCalibration(Calibration):
    """Every unit's ID from the original model's activations, one pass (the paper)."""

    follows_compression = False

    def unit_selection(self, planner, source, unit, k, key):
        return planner.plain_selection(source, unit, k, key)


@dataclass(frozen=True)
class SequentialCalibration(Calibration):
    """Each unit's ID from the model compressed so far."""

    def unit_selection(self, planner, source, unit, k, key):
        return planner.plain_selection(source, unit, k, key)


@dataclass(frozen=True)
class CorrectiveCalibration(Calibration):
    """Channels from the compressed model's input, ``T`` fitted to the original's.

    Parameters
    ----------
    selection : {"gram", "greedy"}, default="gram"
        How ``J`` is chosen: pivoted Cholesky of the compressed Gram, or greedily on the
        cross statistic (:mod:`skid._corrective`; ``benchmarks/bench_fidelity.py``).
    """

    selection: str = "gram"
    needs_reference = True

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}; got {self.selection!r}.")

    def unit_selection(self, planner, source, unit, k, key):
        return planner.corrective_selection(source, unit, k, key, self.selection)


_CALIBRATIONS: dict[str, Calibration] = {
    "original": OriginalCalibration(),
    "sequential": SequentialCalibration(),
    "corrective": CorrectiveCalibration(),
}


def register_calibration(name: str, calibration: Calibration) -> None:
    """Make ``calibration=name`` mean ``calibration``."""
    if not isinstance(calibration, Calibration):
        raise TypeError(
            f"calibration must be a Calibration; got {type(calibration).__name__}.")
    _CALIBRATIONS[name] = calibration


def calibration_for(spec) -> Calibration:
    """The calibration a parameter value names (a :class:`Calibration` stands for itself)."""
    return _lookup(spec, _CALIBRATIONS, Calibration, "calibration")


def calibration_names() -> tuple:
    return tuple(_CALIBRATIONS)


class Registered:
    """A parameter constraint: a registered name or an instance of ``cls``."""

    def __init__(self, names, cls):
        self._names, self._cls = names, cls

    def __call__(self, value) -> bool:
        return isinstance(value, self._cls) or (isinstance(value, str)
                                                and value in self._names())

    @property
    def description(self) -> str:
        names = ", ".join(repr(n) for n in self._names())
        return f"one of {names} or an instance of {self._cls.__name__}"


def _lookup(spec, registry, cls, what):
    if isinstance(spec, cls):
        return spec
    if isinstance(spec, str) and spec in registry:
        return registry[spec]
    raise ValueError(f"{what} must be one of {sorted(registry)} or a {cls.__name__}; "
                     f"got {spec!r}.")

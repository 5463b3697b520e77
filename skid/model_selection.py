"""Choosing among compressed candidates: the smallest one that stays faithful enough."""

from __future__ import annotations

import numbers

import numpy as np

from ._validation import Interval, check_params

__all__ = ["most_compressed"]


def most_compressed(min_agreement=0.99, *, agreement="agreement", size="flops"):
    """A ``GridSearchCV(refit=...)`` rule: the smallest candidate whose agreement meets a bound.

    Among the candidates whose mean ``agreement`` score is at least ``min_agreement``, pick the
    one with the lowest mean ``size`` score (ties: the higher agreement, then the first). When
    none meets the bound, pick the one with the highest agreement. Failed fits (NaN scores)
    are never picked while another candidate has a score.

    Parameters
    ----------
    min_agreement : float in [0, 1], default=0.99
        Smallest acceptable mean agreement score.
    agreement : str, default="agreement"
        Key of the fidelity scorer in the ``scoring`` dict (greater is better).
    size : str, default="flops"
        Key of the size scorer in the ``scoring`` dict (lower is smaller), e.g. a
        :func:`skid.metrics.flops_kept` or :func:`skid.metrics.params_kept` entry.

    Returns
    -------
    callable
        ``pick(cv_results) -> int``, picklable (so the fitted search can be saved).

    Examples
    --------
    >>> pick = most_compressed(0.99)
    >>> pick({"mean_test_agreement": [1.0, 0.995, 0.97], "mean_test_flops": [0.9, 0.6, 0.3]})
    1
    >>> pick({"mean_test_agreement": [0.9, 0.95], "mean_test_flops": [0.5, 0.6]})
    1
    """
    return _MostCompressed(min_agreement, agreement=agreement, size=size)


class _MostCompressed:
    """The rule returned by :func:`most_compressed` (a class so that it pickles)."""

    def __init__(self, min_agreement=0.99, *, agreement="agreement", size="flops"):
        check_params(
            {"min_agreement": min_agreement, "agreement": agreement, "size": size},
            {
                "min_agreement": [Interval(numbers.Real, 0, 1)],
                "agreement": [str],
                "size": [str],
            },
            "most_compressed",
        )
        self.min_agreement = min_agreement
        self.agreement = agreement
        self.size = size

    def __call__(self, cv_results) -> int:
        """Index of the chosen candidate in ``cv_results`` (a ``GridSearchCV.cv_results_``)."""
        agreement = self._scores(cv_results, self.agreement)
        size = self._scores(cv_results, self.size)
        if np.all(np.isnan(agreement)):
            raise ValueError(
                f"Every candidate's mean_test_{self.agreement} is NaN: all fits failed? "
                "See the warnings GridSearchCV issued for each failed fit."
            )
        meets = np.nan_to_num(agreement, nan=-np.inf) >= self.min_agreement
        meets &= ~np.isnan(size)
        if not meets.any():
            return int(np.nanargmax(agreement))
        candidates = np.flatnonzero(meets)
        # lexicographic: smallest size, then highest agreement, then first index
        order = np.lexsort((candidates, -agreement[candidates], size[candidates]))
        return int(candidates[order[0]])

    def _scores(self, cv_results, name: str) -> np.ndarray:
        """``cv_results["mean_test_<name>"]`` as float64, with a clear error when missing."""
        key = f"mean_test_{name}"
        if key not in cv_results:
            prefix = "mean_test_"
            found = sorted(k[len(prefix) :] for k in cv_results if k.startswith(prefix))
            raise KeyError(
                f"most_compressed looks for {key!r} in cv_results_, but the scorers are "
                f"{found}; pass scoring={{{self.agreement!r}: ..., {self.size!r}: ...}} to "
                f"GridSearchCV or set most_compressed(agreement=..., size=...)."
            )
        return np.asarray(cv_results[key], dtype=np.float64)

    def __repr__(self) -> str:
        return (
            f"most_compressed({self.min_agreement!r}, agreement={self.agreement!r}, "
            f"size={self.size!r})"
        )

"""Choosing among compressed candidates: the smallest one that stays faithful enough."""

from __future__ import annotations

import numbers

import numpy as np

from ._validation import Interval, check_params

__all__ = ["most_compressed"]


def most_compressed(min_agreement=None, *, max_perplexity_ratio=None, agreement="agreement",
                    perplexity="perplexity", size="flops"):
    """A ``GridSearchCV(refit=...)`` rule: the smallest candidate whose fidelity meets a bound.

    Among the candidates whose mean ``agreement`` score is at least ``min_agreement`` (and,
    when ``max_perplexity_ratio`` is given, whose mean ``perplexity`` score is at most it),
    pick the one with the lowest mean ``size`` score (ties: the better fidelity, then the
    first). When none meets the bounds, pick the most faithful one: the highest agreement, or
    with only a perplexity bound the lowest perplexity ratio. Failed fits (NaN scores) are
    never picked while another candidate has a score.

    Parameters
    ----------
    min_agreement : float in [0, 1], default=None
        Smallest acceptable mean agreement score (greater is better). None: 0.99, unless
        ``max_perplexity_ratio`` is given, which is then the only bound.
    max_perplexity_ratio : float >= 1, default=None
        Largest acceptable mean score of a lower-is-better fidelity scorer, e.g.
        :func:`skid.metrics.perplexity_ratio` (compressed ÷ original perplexity).
    agreement : str, default="agreement"
        Key of the greater-is-better fidelity scorer in the ``scoring`` dict.
    perplexity : str, default="perplexity"
        Key of the lower-is-better fidelity scorer in the ``scoring`` dict.
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
    >>> pick = most_compressed(max_perplexity_ratio=1.1)
    >>> pick({"mean_test_perplexity": [1.0, 1.05, 1.4], "mean_test_flops": [0.9, 0.6, 0.3]})
    1
    """
    return _MostCompressed(min_agreement, max_perplexity_ratio=max_perplexity_ratio,
                           agreement=agreement, perplexity=perplexity, size=size)


class _MostCompressed:
    """The rule returned by :func:`most_compressed` (a class so that it pickles)."""

    def __init__(self, min_agreement=None, *, max_perplexity_ratio=None, agreement="agreement",
                 perplexity="perplexity", size="flops"):
        check_params(
            {"min_agreement": min_agreement, "max_perplexity_ratio": max_perplexity_ratio,
             "agreement": agreement, "perplexity": perplexity, "size": size},
            {
                "min_agreement": [None, Interval(numbers.Real, 0, 1)],
                "max_perplexity_ratio": [None, Interval(numbers.Real, 1, None)],
                "agreement": [str],
                "perplexity": [str],
                "size": [str],
            },
            "most_compressed",
        )
        if min_agreement is None and max_perplexity_ratio is None:
            min_agreement = 0.99
        self.min_agreement = min_agreement
        self.max_perplexity_ratio = max_perplexity_ratio
        self.agreement = agreement
        self.perplexity = perplexity
        self.size = size

    def __call__(self, cv_results) -> int:
        """Index of the chosen candidate in ``cv_results`` (a ``GridSearchCV.cv_results_``)."""
        size = self._scores(cv_results, self.size)
        # fidelity, greater is better, with its bound
        checks = []
        if self.min_agreement is not None:
            checks.append((self._scores(cv_results, self.agreement), self.min_agreement))
        if self.max_perplexity_ratio is not None:
            ratio = self._scores(cv_results, self.perplexity)
            checks.append((-ratio, -self.max_perplexity_ratio))
        fidelity = checks[0][0]
        if np.all(np.isnan(fidelity)):
            name = self.agreement if self.min_agreement is not None else self.perplexity
            raise ValueError(
                f"Every candidate's mean_test_{name} is NaN: all fits failed? "
                "See the warnings GridSearchCV issued for each failed fit."
            )
        meets = ~np.isnan(size)
        for scores, bound in checks:
            meets &= np.nan_to_num(scores, nan=-np.inf) >= bound
        if not meets.any():
            return int(np.nanargmax(fidelity))
        candidates = np.flatnonzero(meets)
        # lexicographic: smallest size, then best fidelity, then first index
        order = np.lexsort((candidates, -fidelity[candidates], size[candidates]))
        return int(candidates[order[0]])

    def _scores(self, cv_results, name: str) -> np.ndarray:
        """``cv_results["mean_test_<name>"]`` as float64, with a clear error when missing."""
        key = f"mean_test_{name}"
        if key not in cv_results:
            prefix = "mean_test_"
            found = sorted(k[len(prefix) :] for k in cv_results if k.startswith(prefix))
            wanted = [self.size]
            wanted += [self.agreement] if self.min_agreement is not None else []
            wanted += [self.perplexity] if self.max_perplexity_ratio is not None else []
            entries = ", ".join(f"{w!r}: ..." for w in sorted(wanted))
            raise KeyError(
                f"most_compressed looks for {key!r} in cv_results_, but the scorers are "
                f"{found}; pass scoring={{{entries}}} to GridSearchCV or set "
                "most_compressed(agreement=..., perplexity=..., size=...)."
            )
        return np.asarray(cv_results[key], dtype=np.float64)

    def __repr__(self) -> str:
        bounds = [] if self.min_agreement is None else [repr(self.min_agreement)]
        if self.max_perplexity_ratio is not None:
            bounds += [f"max_perplexity_ratio={self.max_perplexity_ratio!r}",
                       f"perplexity={self.perplexity!r}"]
        if self.min_agreement is not None:
            bounds.append(f"agreement={self.agreement!r}")
        return f"most_compressed({', '.join(bounds)}, size={self.size!r})"

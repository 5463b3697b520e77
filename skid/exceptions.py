"""Exceptions raised by skid."""

from sklearn.exceptions import NotFittedError

__all__ = ["InvalidParameterError", "NotFittedError", "NotPrunableError"]


class InvalidParameterError(ValueError, TypeError):
    """A constructor parameter has a wrong type or value (checked when ``fit`` starts).

    Subclasses both ValueError and TypeError, like scikit-learn's own, so either catches it.
    """


class NotPrunableError(ValueError):
    """The model has no unit that can be pruned with the given settings.

    The message lists every candidate layer and the reason it was skipped.
    """

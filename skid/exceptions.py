"""Exceptions raised by skid."""

from sklearn.exceptions import NotFittedError

__all__ = ["NotFittedError", "NotPrunableError"]


class NotPrunableError(ValueError):
    """The model has no unit that can be pruned with the given settings.

    The message lists every candidate layer and the reason it was skipped.
    """

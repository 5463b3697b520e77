"""Hooks that live for the span of a ``with`` block."""

from __future__ import annotations

__all__ = ["HookSet"]


class HookSet:
    """A set of module hooks registered on entering the context and removed on leaving it
    (also when registering them fails half-way). Subclasses register them in
    :meth:`register`, handing each handle to :meth:`keep`."""

    def __init__(self):
        self._handles = []

    def register(self) -> None:
        raise NotImplementedError

    def keep(self, handle) -> None:
        self._handles.append(handle)

    def __enter__(self):
        try:
            self.register()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

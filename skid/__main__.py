"""``python -m skid``: the same as the ``skid`` command."""

from .cli import main

if __name__ == "__main__":  # not when imported, e.g. by pytest's doctest collection
    raise SystemExit(main())

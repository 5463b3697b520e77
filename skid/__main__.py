"""``python -m skid``: the same as the ``skid`` command."""

import os
import sys


def _drop_working_directory():
    """Take the working directory off the front of ``sys.path``.

    ``python -m`` puts it first, where a stray ``shlex.py`` or ``statistics.py`` would shadow
    the standard library for every later import (torch imports such modules lazily). skid is
    already imported at this point; ``python -P`` (Python 3.11+) does the same from the start.
    """
    if not getattr(sys.flags, "safe_path", False) and sys.path[:1] in ([""], [os.getcwd()]):
        del sys.path[0]


if __name__ == "__main__":  # not when imported, e.g. by pytest's doctest collection
    _drop_working_directory()
    from skid.cli import main

    raise SystemExit(main())

"""Suite-wide fixtures: a seeded torch, thread settings restored, each example run once.

``SKID_TEST_SEED`` (default 0) seeds torch's global generator before every test, and
``SKID_TEST_THREADS`` (default 1) is the torch thread count of the nn tests: change either
to check that no test depends on them.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

SEED = int(os.environ.get("SKID_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _torch_state():
    """Seed torch before the test; put back the thread count if the test changed it."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        yield
        return
    threads = torch.get_num_threads()
    torch.manual_seed(SEED)
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_DOCS_BUILD = "test_sphinx_build_has_no_warnings"
_DOCS_MODULES = ("sphinx", "numpydoc", "sphinx_gallery", "matplotlib", "pandas")


@pytest.hookimpl(trylast=True)  # after -m/-k have deselected
def pytest_collection_modifyitems(config, items):
    """The docs build executes the gallery: when it runs, the examples are not run again."""
    if not any(_name(item) == _DOCS_BUILD for item in items):
        return
    if not all(importlib.util.find_spec(name) for name in _DOCS_MODULES):
        return
    skip = pytest.mark.skip(reason=f"the docs build ({_DOCS_BUILD}) runs the examples")
    for item in items:
        if _name(item) == "test_example_runs":
            item.add_marker(skip)


def _name(item) -> str:
    """A test function's name without its parameters (doctest items have none)."""
    return getattr(item, "originalname", item.name)

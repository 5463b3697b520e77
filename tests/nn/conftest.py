"""Fixtures for the nn tests: few threads, the trained digits CNN, the test architectures.

torch's generator is seeded before every test by ``tests/conftest.py``.
"""

import os

import pytest
import torch

from .digits import train_digits_cnn
from .models import ARCHITECTURES, call_args


@pytest.fixture(scope="package", autouse=True)
def _threads():
    """One torch thread (``SKID_TEST_THREADS``): tiny ops only add OpenMP barriers on a busy CPU.

    Restored when the nn tests are done.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SKID_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits():
    """The CNN trained on the digits (once per run) and its data split."""
    return train_digits_cnn()


@pytest.fixture(params=sorted(ARCHITECTURES))
def architecture(request):
    """``(name, model, batch)`` for every architecture of ``tests/nn/models.py``."""
    factory, make_input = ARCHITECTURES[request.param]
    return request.param, factory(), make_input()


@pytest.fixture
def call():
    """``call(model, batch)``: run the model on a batch (dict batches are keyword inputs)."""
    def run(model, batch):
        args, kwargs = call_args(batch)
        with torch.no_grad():
            return model(*args, **kwargs)
    return run

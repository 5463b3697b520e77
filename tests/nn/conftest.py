"""Fixtures for the nn tests: autouse seeding, few threads, and the test architectures."""

import pytest
import torch

from .models import ARCHITECTURES, call_args

torch.set_num_threads(1)  # tiny ops: a second thread only adds OpenMP barriers on a busy CPU


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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

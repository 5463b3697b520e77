"""Folds add the unit columns of ``T`` and multiply only the others: the dense product's
result up to rounding, for plain, dense (corrective-like) and flattened folds."""

import numpy as np
import pytest
import torch
from torch import nn

from skid.nn._surgery import fold_channels, fold_in


def _plain_T(m, keep, seed=0):
    """An ID's ``T``: the identity on the columns ``keep``, dense elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    T = torch.randn(len(keep), m, generator=gen, dtype=torch.float64)
    T[:, keep] = torch.eye(len(keep), dtype=torch.float64)
    return T


def _dense(w, T, dim):
    return torch.movedim(torch.tensordot(T, w, dims=([1], [dim])), 0, dim)


TS = {
    "plain": lambda: _plain_T(12, [7, 0, 3, 11, 5]),
    "all kept": lambda: _plain_T(6, [5, 4, 3, 2, 1, 0]),
    "dense": lambda: torch.randn(5, 12, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(1)),
    # a column with an exact 1 and another nonzero is not a unit column
    "near unit": lambda: torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]], dtype=torch.float64),
    "one unit twice": lambda: torch.tensor([[1.0, 1.0, 0.3], [0.0, 0.0, 0.2]],
                                           dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(TS))
@pytest.mark.parametrize("dim, shape", [(1, (4, None)), (1, (4, None, 3)), (0, (None, 2, 4)),
                                        (1, (3, None, 2, 2))])
def test_fold_channels_is_the_dense_product(name, dim, shape):
    T = TS[name]()
    shape = tuple(T.shape[1] if s is None else s for s in shape)
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = fold_channels(w, T, dim)
    assert out.shape == _dense(w, T, dim).shape
    torch.testing.assert_close(out, _dense(w, T, dim), rtol=1e-12, atol=1e-12)


def test_plain_T_adds_the_kept_columns_exactly():
    keep = [7, 0, 3, 11, 5]
    T = _plain_T(12, keep)
    T[:, [1, 2, 4, 6, 8, 9, 10]] = 0.0  # only the kept channels are read
    w = torch.randn(4, 12, dtype=torch.float64)
    assert torch.equal(fold_channels(w, T), w[:, keep])


@pytest.mark.parametrize("positions", [1, 3])
def test_linear_fold_matches_the_dense_fold(positions):
    layer = nn.Linear(12 * positions, 4).double()
    T = _plain_T(12, [7, 0, 3, 11, 5])
    w = layer.weight.detach().clone().reshape(4, 12, positions)
    expected = torch.einsum("omp,km->okp", w, T).reshape(4, -1)
    fold_in(layer, T.numpy(), positions)
    assert layer.in_features == 5 * positions
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_fold_matches_the_dense_fold(groups):
    conv = nn.Conv2d(4, 6, 3, groups=groups).double()
    blocks = [_plain_T(4 // groups, [1]), _plain_T(4 // groups, [0], seed=1)][:groups]
    if groups == 1:
        blocks = [_plain_T(4, [3, 1])]
    T = torch.block_diag(*blocks)
    weight = conv.weight.detach().clone()
    outputs = 6 // groups
    expected = torch.cat([torch.einsum("om...,km->ok...",
                                       weight[g * outputs:(g + 1) * outputs], block)
                          for g, block in enumerate(blocks)])
    fold_in(conv, np.asarray(T))
    torch.testing.assert_close(conv.weight.detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("positions", [1, 2])
def test_hugging_face_conv1d_fold_matches_the_dense_fold(positions):
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(4, 12 * positions).double()  # weight (in, out)
    T = _plain_T(12, [7, 0, 3, 11, 5])
    w = layer.weight.detach().clone().reshape(12, positions, 4)
    expected = torch.einsum("mpo,km->kpo", w, T).reshape(-1, 4)
    fold_in(layer, T.numpy(), positions)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-12, atol=1e-12)

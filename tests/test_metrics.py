"""skid.metrics: scorers with scikit-learn's signature, on a fitted NetworkCompressor."""

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, KFold

from skid import metrics
from skid.nn import NetworkCompressor

from .nn.models import make_bert_layer, make_mlp, make_text_input


@pytest.fixture(scope="module")
def fitted():
    """A compressed MLP (half of each layer's width) and held-out inputs."""
    torch.manual_seed(0)
    X = torch.randn(60, 8)
    return NetworkCompressor(make_mlp(), rank=0.5).fit(X[:40]), X[40:]


def test_agreement_is_top1_agreement_with_the_original(fitted):
    nc, X = fitted
    original = nc.model(X).detach().numpy().argmax(axis=1)
    expected = np.mean(nc.predict(X) == original)
    assert metrics.agreement(nc, X) == pytest.approx(expected)
    assert metrics.agreement(nc, X, y=np.zeros(20)) == pytest.approx(expected)  # y is ignored
    assert nc.score(X) == pytest.approx(expected)


def test_accuracy_against_labels(fitted):
    nc, X = fitted
    y = np.arange(20) % 4
    assert metrics.accuracy(nc, X, y) == pytest.approx(np.mean(nc.predict(X) == y))
    assert metrics.accuracy(nc, X, torch.as_tensor(y)) == metrics.accuracy(nc, X, y)
    with pytest.raises(ValueError, match="accuracy needs labels"):
        metrics.accuracy(nc, X, None)
    with pytest.raises(ValueError, match="3 labels for 20 samples"):
        metrics.accuracy(nc, X, y[:3])


def test_output_similarity(fitted):
    nc, X = fitted
    a, b = nc.transform(X), nc._original_outputs(X)
    cosine = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert metrics.output_similarity(nc, X) == pytest.approx(cosine.mean(), rel=1e-6)
    exact = NetworkCompressor(make_mlp(), rank=1.0).fit(X)
    assert metrics.output_similarity(exact, X) == pytest.approx(1.0, abs=1e-6)


def test_output_similarity_of_embedding_outputs():
    batch = make_text_input(6)
    nc = NetworkCompressor(make_bert_layer(), rank=1.0).fit([batch])
    assert metrics.output_similarity(nc, [batch]) == pytest.approx(1.0, abs=1e-6)


def test_mean_cosine_similarity_edge_cases():
    assert metrics.mean_cosine_similarity([[1.0, 0.0]], [[-2.0, 0.0]]) == pytest.approx(-1.0)
    assert metrics.mean_cosine_similarity([[0.0, 0.0]], [[0.0, 0.0]]) == 1.0
    assert metrics.mean_cosine_similarity([[0.0, 0.0]], [[1.0, 0.0]]) == 0.0
    with pytest.raises(ValueError, match="zero samples"):
        metrics.mean_cosine_similarity(np.empty((0, 2)), np.empty((0, 2)))


def test_sizes_kept(fitted):
    nc, X = fitted
    assert metrics.flops_kept(nc, X) == pytest.approx(nc.flops_["after"] / nc.flops_["before"])
    assert metrics.params_kept(nc, X) == pytest.approx(nc.params_["after"] / nc.params_["before"])
    assert 0 < metrics.flops_kept(nc) < 1 and 0 < metrics.params_kept(nc) < 1


@pytest.mark.parametrize(
    "scorer",
    [metrics.agreement, metrics.output_similarity, metrics.flops_kept, metrics.params_kept],
)
def test_unfitted_estimator(scorer):
    with pytest.raises(NotFittedError):
        scorer(NetworkCompressor(make_mlp()), torch.randn(4, 8))


def test_scorers_in_a_grid_search():
    torch.manual_seed(0)
    X = torch.randn(80, 8)
    y = np.arange(80) % 4
    search = GridSearchCV(
        NetworkCompressor(make_mlp()),
        {"rank": [0.3, 1.0]},
        scoring={
            "agreement": metrics.agreement,
            "accuracy": metrics.accuracy,
            "similarity": metrics.output_similarity,
            "flops": metrics.flops_kept,
            "params": metrics.params_kept,
        },
        refit=False,
        cv=KFold(2),
    ).fit(X, y)
    results = search.cv_results_
    assert results["mean_test_agreement"][1] == 1.0
    assert results["mean_test_similarity"][1] == pytest.approx(1.0, abs=1e-6)
    assert results["mean_test_flops"][0] < results["mean_test_flops"][1] == 1.0
    assert results["mean_test_params"][0] < 1.0
    assert np.all((results["mean_test_accuracy"] >= 0) & (results["mean_test_accuracy"] <= 1))

"""skid.model_selection.most_compressed: the refit rule for GridSearchCV."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV, KFold

from skid import metrics
from skid.exceptions import InvalidParameterError
from skid.model_selection import most_compressed
from skid.nn import NetworkCompressor

from .nn.models import make_mlp


def results(agreement, flops, **extra):
    cv = {"mean_test_agreement": np.array(agreement), "mean_test_flops": np.array(flops)}
    return cv | {f"mean_test_{k}": np.array(v) for k, v in extra.items()}


def test_smallest_among_those_meeting_the_bound():
    pick = most_compressed(0.99)
    assert pick(results([1.0, 0.995, 0.99, 0.97], [0.9, 0.6, 0.5, 0.3])) == 2
    assert pick(results([0.999, 0.999], [0.5, 0.5])) == 0


def test_ties_in_size_go_to_the_higher_agreement():
    assert most_compressed(0.9)(results([0.95, 0.99, 0.97], [0.5, 0.5, 0.7])) == 1


def test_highest_agreement_when_none_meets_the_bound():
    assert most_compressed(0.99)(results([0.9, 0.95, 0.93], [0.2, 0.6, 0.4])) == 1


def test_failed_fits_are_not_picked():
    pick = most_compressed(0.9)
    assert pick(results([np.nan, 0.95, 0.99], [0.1, np.nan, 0.8])) == 2
    assert pick(results([np.nan, 0.5], [0.1, 0.2])) == 1
    with pytest.raises(ValueError, match="all fits failed"):
        pick(results([np.nan, np.nan], [0.1, 0.2]))


def test_custom_scorer_names():
    pick = most_compressed(0.5, agreement="similarity", size="params")
    cv = results([0, 0], [0, 0], similarity=[0.9, 0.6], params=[0.8, 0.4])
    assert pick(cv) == 1


def test_missing_scorer_names_the_available_ones():
    with pytest.raises(KeyError, match=r"mean_test_size.*\['agreement', 'flops'\]"):
        most_compressed(size="size")(results([1.0], [0.5]))


@pytest.mark.parametrize("bound", [-0.1, 1.5, "high"])
def test_invalid_bound(bound):
    with pytest.raises(InvalidParameterError, match="min_agreement"):
        most_compressed(bound)
    with pytest.raises(InvalidParameterError, match="max_perplexity_ratio"):
        most_compressed(max_perplexity_ratio=0.5)


def test_default_bound_is_an_agreement_of_099_unless_a_perplexity_bound_is_given():
    assert most_compressed().min_agreement == most_compressed(None).min_agreement == 0.99
    assert most_compressed(max_perplexity_ratio=1.1).min_agreement is None


def test_bound_on_a_lower_is_better_score():
    pick = most_compressed(max_perplexity_ratio=1.1)
    cv = results([0, 0, 0, 0], [0.9, 0.5, 0.6, 0.3], perplexity=[1.0, 1.1, 1.05, 1.3])
    assert pick(cv) == 1  # the smallest within the bound (the bound itself included)
    cv = results([0, 0], [0.5, 0.4], perplexity=[1.5, 1.2])
    assert pick(cv) == 1  # none meets it: the lowest perplexity ratio
    both = most_compressed(0.9, max_perplexity_ratio=1.1)
    cv = results([0.95, 0.8, 0.95], [0.9, 0.5, 0.6], perplexity=[1.0, 1.05, 1.2])
    assert both(cv) == 0  # the second fails the agreement, the third the perplexity
    with pytest.raises(KeyError, match=r"mean_test_perplexity.*'flops': ..., 'perplexity'"):
        pick(results([1.0], [0.5]))
    assert repr(pick) == (
        "most_compressed(max_perplexity_ratio=1.1, perplexity='perplexity', size='flops')")


def test_picklable_and_readable():
    pick = most_compressed(0.95, size="params")
    again = pickle.loads(pickle.dumps(pick))
    assert again(results([0.96], [0.5], params=[0.4])) == 0
    assert repr(pick) == "most_compressed(0.95, agreement='agreement', size='params')"


def test_refit_rule_in_a_grid_search():
    torch.manual_seed(0)
    X = torch.randn(80, 8)
    search = GridSearchCV(
        NetworkCompressor(make_mlp()),
        {"rank": [0.2, 0.5, 0.8, 1.0]},
        scoring={"agreement": metrics.agreement, "flops": metrics.flops_kept},
        refit=most_compressed(0.9),
        cv=KFold(2),
    ).fit(X)
    agreement = search.cv_results_["mean_test_agreement"]
    flops = search.cv_results_["mean_test_flops"]
    meeting = np.flatnonzero(agreement >= 0.9)
    assert search.best_index_ == meeting[np.argmin(flops[meeting])]
    assert search.best_params_ == {"rank": [0.2, 0.5, 0.8, 1.0][search.best_index_]}
    assert search.best_estimator_.compressed_model_ is not None
    assert 0.0 <= search.best_estimator_.score(X) <= 1.0  # the refit's own agreement: no bound

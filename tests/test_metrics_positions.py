"""skid.metrics per position: tokens of a language model, pixels of a map, padding left out."""

import math

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator
from sklearn.model_selection import GridSearchCV, KFold
from torch import nn

from skid import metrics
from skid.model_selection import most_compressed
from skid.nn import NetworkCompressor
from skid.nn._outputs import ModelOutputs


class _Given(BaseEstimator):
    """A stand-in for a fitted estimator whose outputs are given (metrics read only these)."""

    def __init__(self, compressed=None, original=None):
        self.compressed = compressed
        self.original = original
        self.fitted_ = True

    def fit(self):  # check_is_fitted wants an estimator
        return self

    def outputs(self, X, *, original=False):
        return self.original if original else self.compressed


def _outputs(values, masks=None, labels=None, tokens=None):
    n = len(values)
    return ModelOutputs(list(values), masks or [None] * n, labels or [None] * n,
                        tokens or [None] * n)


def test_agreement_of_logits_is_per_token_with_padding_left_out():
    rng = np.random.default_rng(0)
    ours, theirs = rng.standard_normal((2, 3, 5, 7))  # (n, seq, vocab)
    theirs[0, 2] = ours[0, 2]  # one more agreeing token, but it is padding
    mask = np.ones((3, 5), dtype=bool)
    mask[0, 2:] = False
    same = ours.argmax(-1) == theirs.argmax(-1)
    given = _Given(_outputs([ours]), _outputs([theirs], masks=[mask]))
    assert metrics.agreement(given, None) == pytest.approx(same[mask].mean())
    unmasked = _Given(_outputs([ours]), _outputs([theirs]))
    assert metrics.agreement(unmasked, None) == pytest.approx(same.mean())
    assert same[mask].mean() != same.mean()


def test_agreement_of_maps_is_per_pixel_and_axis_chooses_the_class_axis():
    rng = np.random.default_rng(1)
    ours, theirs = rng.standard_normal((2, 2, 4, 3, 3))  # (n, C, H, W)
    given = _Given(_outputs([ours[:1], ours[1:]]), _outputs([theirs[:1], theirs[1:]]))
    per_pixel = np.mean(ours.argmax(1) == theirs.argmax(1))
    assert metrics.agreement(given, None) == pytest.approx(per_pixel)
    # (n, C, L) maps: the default reads (n, seq, vocab); axis=1 says otherwise
    flat = _Given(_outputs([ours.reshape(2, 4, 9)]), _outputs([theirs.reshape(2, 4, 9)]))
    assert metrics.agreement(flat, None, axis=1) == pytest.approx(per_pixel)
    with pytest.raises(ValueError, match="axis=0 is not a class axis"):
        metrics.agreement(flat, None, axis=0)


def test_mask_of_another_shape_asks_for_the_axis():
    given = _Given(_outputs([np.zeros((2, 4, 3))]),
                   _outputs([np.zeros((2, 4, 3))], masks=[np.ones((2, 3), dtype=bool)]))
    with pytest.raises(ValueError, match="pass axis="):
        metrics.agreement(given, None)
    assert metrics.agreement(given, None, axis=1) == 1.0


def test_perplexity_on_tokens_skips_padding_and_on_labels_skips_minus_100():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((2, 4, 5))
    tokens = rng.integers(0, 5, (2, 4))
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=bool)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    given = _Given(_outputs([logits]), _outputs([logits], masks=[mask], tokens=[tokens]))
    valid = mask[:, 1:] & mask[:, :-1]
    assert metrics.perplexity(given, None, original=True) == pytest.approx(
        math.exp(nll[valid].mean()))
    labels = np.where(mask, tokens, -100)
    given = _Given(_outputs([logits]), _outputs([logits], labels=[labels]))
    assert metrics.perplexity(given, None, original=True) == pytest.approx(
        math.exp(nll[mask[:, 1:]].mean()))
    with pytest.raises(ValueError, match="needs the token ids"):
        metrics.perplexity(given, None)
    with pytest.raises(ValueError, match=r"needs \(n, seq, vocab\) logits"):
        metrics.perplexity(_Given(_outputs([logits[:, 0]], tokens=[tokens]), None), None)


# ----------------------------------------------------------------- real models, end to end


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def language_model():
    model = _llama()
    ids = torch.randint(0, 32, (24, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::3, 5:] = 0  # right padding
    return model, NetworkCompressor(model, rank=0.5).fit(ids), ids, mask


def test_language_model_agreement_is_per_token_agreement(language_model):
    model, nc, ids, mask = language_model
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        ours = nc.compressed_model_(**batch).logits.argmax(-1)
        theirs = model(**batch).logits.argmax(-1)
    by_hand = (ours == theirs)[mask.bool()].double().mean().item()
    assert metrics.agreement(nc, batch) == pytest.approx(by_hand)
    assert nc.score([batch]) == pytest.approx(by_hand)  # a list of dict batches too
    everywhere = (ours == theirs).double().mean().item()
    assert metrics.agreement(nc, ids) == pytest.approx(
        (nc.compressed_model_(ids).logits.argmax(-1) == model(ids).logits.argmax(-1))
        .double().mean().item())
    assert by_hand != everywhere or mask.all()


def test_language_model_perplexity_matches_the_models_own_loss(language_model):
    model, nc, ids, mask = language_model
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        loss_original = model(**batch).loss.item()
        loss_compressed = nc.compressed_model_(**batch).loss.item()
    big = NetworkCompressor(model, rank=0.5, batch_size=len(ids)).fit(ids)  # one batch: one mean
    assert metrics.perplexity(big, batch, original=True) == pytest.approx(
        math.exp(loss_original), rel=1e-5)
    assert metrics.perplexity_ratio(big, batch) == pytest.approx(
        math.exp(loss_compressed - loss_original), rel=1e-5)
    # without labels, the token ids are the targets and padding is left out the same way here
    plain = {"input_ids": ids, "attention_mask": mask}
    assert metrics.perplexity_ratio(big, plain) == pytest.approx(
        metrics.perplexity_ratio(big, batch), rel=1e-6)


def test_segmentation_map_agreement_is_per_pixel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 5, 1)).eval()
    X = torch.randn(12, 3, 6, 6)
    nc = NetworkCompressor(model, rank=0.25).fit(X)
    with torch.no_grad():
        same = nc.compressed_model_(X).argmax(1) == model(X).argmax(1)
    assert metrics.agreement(nc, X) == pytest.approx(same.double().mean().item())
    pixels = model(X).argmax(1).numpy()
    assert metrics.accuracy(nc, X, pixels) == pytest.approx(same.double().mean().item())


def test_grid_search_with_language_model_scorers(language_model):
    model, _, ids, _ = language_model
    search = GridSearchCV(
        NetworkCompressor(model),
        {"rank": [0.25, 0.5, 1.0]},
        scoring={"agreement": metrics.agreement, "perplexity": metrics.perplexity_ratio,
                 "flops": metrics.flops_kept},
        refit=most_compressed(max_perplexity_ratio=1.02),
        cv=KFold(2),
    ).fit(ids)
    results = search.cv_results_
    assert results["mean_test_perplexity"][2] == pytest.approx(1.0, abs=1e-5)
    assert results["mean_test_agreement"][2] == pytest.approx(1.0)
    meeting = np.flatnonzero(results["mean_test_perplexity"] <= 1.02)
    assert search.best_index_ == meeting[np.argmin(results["mean_test_flops"][meeting])]

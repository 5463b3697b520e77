"""Errors that name their cause, not X's batching or NaN values."""

import pytest
import torch

from skid import NetworkCompressor

from .models import make_bert_layer, make_text_input


@pytest.mark.parametrize("blocks", ["auto", None])
@pytest.mark.parametrize("calibration", ["original", "corrective"])
def test_an_all_padding_mask_is_named(blocks, calibration):
    data = make_text_input(n=8, length=6)
    data["attention_mask"] = torch.zeros_like(data["attention_mask"])
    nc = NetworkCompressor(make_bert_layer(n_layers=2), rank=0.5, batch_size=4, blocks=blocks,
                           calibration=calibration)
    with pytest.raises(ValueError, match="No non-padding rows reached .*attention_mask is 0"):
        nc.fit(data)


def test_a_meta_device_model_is_named():
    with torch.device("meta"):
        model = make_bert_layer(n_layers=2)
    with pytest.raises(ValueError, match="The model is on the meta device"):
        NetworkCompressor(model, rank=0.5).fit(make_text_input(n=8, length=6))

"""``transformers`` models with the attention layouts added after the first head families:
DistilBERT, BART, Marian, Whisper, CLIP text and vision (tiny configs, CPU, no downloads).

``HF_ATTENTION`` maps a name to ``(factory, make_input, attention blocks)`` where the blocks are
the qualified names of the attention modules whose heads are pruned, in forward order.
"""

from __future__ import annotations

import torch

__all__ = ["HF_ATTENTION"]

VOCAB, HIDDEN, INNER = 64, 16, 24


def _transformers():
    import transformers

    return transformers


def _distilbert():
    config = _transformers().DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=2,
                                              n_heads=4, hidden_dim=INNER,
                                              max_position_embeddings=32)
    return _transformers().DistilBertModel(config)


def _seq2seq(config_name, model_name, **extra):
    config = getattr(_transformers(), config_name)(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=INNER,
        decoder_ffn_dim=INNER, max_position_embeddings=32, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, **extra)
    return getattr(_transformers(), model_name)(config)


def _whisper():
    config = _transformers().WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, encoder_layers=1, decoder_layers=1, d_model=HIDDEN,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=INNER,
        decoder_ffn_dim=INNER, max_source_positions=8, max_target_positions=16,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return _transformers().WhisperModel(config)


def _clip_text():
    config = _transformers().CLIPTextConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                            intermediate_size=INNER, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=32,
                                            bos_token_id=0, eos_token_id=2)
    return _transformers().CLIPTextModel(config)


def _clip_vision():
    config = _transformers().CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=INNER,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              image_size=8, patch_size=4)
    return _transformers().CLIPVisionModel(config)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _text(n=2, seed=0):
    ids = torch.randint(3, VOCAB, (n, 6), generator=_gen(seed))
    mask = torch.ones_like(ids)
    mask[-1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _translation(n=2, seed=0):
    return {**_text(n, seed),
            "decoder_input_ids": torch.randint(3, VOCAB, (n, 5), generator=_gen(seed + 1))}


def _audio(n=2, seed=0):
    return {"input_features": torch.randn(n, 8, 16, generator=_gen(seed)),
            "decoder_input_ids": torch.randint(3, VOCAB, (n, 5), generator=_gen(seed + 1))}


def _pixels(n=2, seed=0):
    return {"pixel_values": torch.randn(n, 3, 8, 8, generator=_gen(seed))}


_ENCODER_DECODER = ("encoder.layers.0.self_attn", "decoder.layers.0.self_attn",
                    "decoder.layers.0.encoder_attn")

HF_ATTENTION = {
    "distilbert": (_distilbert, _text, ("transformer.layer.0.attention",
                                        "transformer.layer.1.attention")),
    "bart": (lambda: _seq2seq("BartConfig", "BartModel"), _translation, _ENCODER_DECODER),
    "marian": (lambda: _seq2seq("MarianConfig", "MarianModel"), _translation,
               _ENCODER_DECODER),
    "whisper": (_whisper, _audio, _ENCODER_DECODER),
    "clip_text": (_clip_text, _text, ("encoder.layers.0.self_attn",
                                      "encoder.layers.1.self_attn")),
    "clip_vision": (_clip_vision, _pixels, ("encoder.layers.0.self_attn",
                                            "encoder.layers.1.self_attn")),
}

"""Hugging Face ``transformers`` models from tiny configs (CPU only), with their inputs.

``HF_MODELS`` maps a name to ``(factory, make_input)``; ``make_input(n=2, seed=0)`` returns a
batch as the compressor receives it (a dict of token ids and mask, or a tensor of pixels).
``transformers`` is imported when a factory runs, not when this module is imported.
"""

from __future__ import annotations

import torch

__all__ = ["HF_MODELS", "INNER"]

VOCAB, HIDDEN, INNER = 64, 16, 24


def _transformers():
    import transformers

    return transformers


def _decoder(config_class, model_class, **extra):
    config = config_class(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INNER,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=32, **extra)
    return model_class(config)


def _llama():
    return _decoder(_transformers().LlamaConfig, _transformers().LlamaForCausalLM)


def _qwen2():
    return _decoder(_transformers().Qwen2Config, _transformers().Qwen2ForCausalLM)


def _mistral():
    return _decoder(_transformers().MistralConfig, _transformers().MistralForCausalLM,
                    sliding_window=16)


def _t5():
    config = _transformers().T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=4, d_ff=INNER,
                                   num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
    return _transformers().T5EncoderModel(config)


def _gpt2():
    config = _transformers().GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4,
                                     n_positions=32, n_inner=INNER)
    return _transformers().GPT2LMHeadModel(config)


def _vit():
    config = _transformers().ViTConfig(hidden_size=HIDDEN, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=INNER,
                                    image_size=8, patch_size=4, num_channels=3)
    return _transformers().ViTModel(config)


def _bert():
    config = _transformers().BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=INNER, max_position_embeddings=32)
    return _transformers().BertModel(config)


def _text(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(n=2, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))




HF_MODELS = {
    "llama": (_llama, _text),
    "qwen2": (_qwen2, _text),
    "mistral": (_mistral, _text),
    "t5_gated": (_t5, _text),
    "gpt2": (_gpt2, _text),
    "vit": (_vit, _pixels),
    "bert": (_bert, _text),
}

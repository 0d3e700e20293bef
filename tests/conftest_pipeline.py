"""Shared helpers of the pipeline and checkpoint tests: a tiny random Llama (a few MB) with
the default model's tokenizer, saved as a Hugging Face directory."""
import os

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True,
            max_position_embeddings=512)


def tiny_model(seed=0, **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, **overrides})
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


_TOKENIZER = {}


def default_tokenizer():
    """SmolLM2's tokenizer: from the cached default model if present, else from the GGUF."""
    if "tok" not in _TOKENIZER:
        from transformers import AutoTokenizer

        from qamw_ext import models

        cached = os.path.join(models.cache_dir(), models.DEFAULT_MODEL)
        if os.path.exists(os.path.join(cached, ".complete")):
            _TOKENIZER["tok"] = AutoTokenizer.from_pretrained(cached)
        else:
            d, f = models.default_gguf()
            _TOKENIZER["tok"] = AutoTokenizer.from_pretrained(d, gguf_file=f)
    return _TOKENIZER["tok"]


def save_tiny(path, seed=0):
    model = tiny_model(seed)
    model.save_pretrained(path, safe_serialization=True)
    default_tokenizer().save_pretrained(path)
    return model

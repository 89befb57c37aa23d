"""Tiny random-config Hugging Face models of every architecture ``patch_model`` supports.

Reused by other test modules: ``tiny_model(model_type, causal_lm=False, dtype=torch.float32)``
returns an ``XModel`` (or ``XForCausalLM``) in eval mode, seeded so every call with the same
arguments gives the same weights. The configs are small (2 layers, C = 64) but keep what
matters to attention: GQA (4 query heads, 2 K/V heads), a head dim of 16, a sliding window
shorter than the test sequences where the architecture has one (so a model that silently
applied it would fail the full-attention parity test), Gemma2's attention softcap small
enough to bite, a ``query_pre_attn_scalar`` that differs from the head dim, and weights
initialised with std 0.1 so attention patterns are sharp rather than nearly uniform.
"""
from __future__ import annotations

import torch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
VOCAB = 97

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.1,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

_EXTRA = {
    "llama": dict(),
    "mistral": dict(sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "gemma": dict(),
    "gemma2": dict(sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=5.0, query_pre_attn_scalar=24),
    "phi3": dict(sliding_window=4, original_max_position_embeddings=256),
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    if model_type not in _EXTRA:
        raise ValueError(f"model_type: expected one of {list(SUPPORTED)}, got {model_type!r}")
    kw = dict(_COMMON)
    kw.update(_EXTRA[model_type])
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, causal_lm: bool = False, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random ``XModel`` / ``XForCausalLM`` of ``model_type`` in ``dtype``, eval mode.

    Weights come from a fixed seed (the global RNG state is saved and restored, so the
    caller's random inputs do not depend on whether a model was built).
    """
    from transformers import AutoModel, AutoModelForCausalLM

    cfg = tiny_config(model_type, **overrides)
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(1234 + SUPPORTED.index(model_type))
        model = cls.from_config(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model.to(dtype).eval()

"""llm2vec-fast: fused kernels and a training pipeline that turn decoder-only LLMs into text encoders.

Public API (imported lazily, so ``import llm2vec_fast`` costs almost nothing and pulls in
neither transformers nor triton):

- ops: :func:`flash_attn_varlen_noncausal`, :func:`flash_attn_noncausal`,
  :func:`masked_linear_cross_entropy`, :func:`pool`, :func:`info_nce`, :func:`pooled_info_nce`
- Hugging Face: :func:`patch_model`, :func:`unpatch_model`, :class:`LLM2Vec`
- the offline default model and data: :func:`load_default_model`, ``llm2vec_fast.data``
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "flash_attn_varlen_noncausal": "llm2vec_fast.ops.attention",
    "flash_attn_noncausal": "llm2vec_fast.ops.attention",
    "masked_linear_cross_entropy": "llm2vec_fast.ops.masked_ce",
    "pool": "llm2vec_fast.ops.info_nce",
    "info_nce": "llm2vec_fast.ops.info_nce",
    "pooled_info_nce": "llm2vec_fast.ops.info_nce",
    "patch_model": "llm2vec_fast.hf.patch",
    "unpatch_model": "llm2vec_fast.hf.patch",
    "SUPPORTED_MODEL_TYPES": "llm2vec_fast.hf.patch",
    "LLM2Vec": "llm2vec_fast.encoder",
    "load_default_model": "llm2vec_fast.models",
    "DEFAULT_MODEL_NAME": "llm2vec_fast.models",
}

__all__ = sorted(_LAZY) + ["data", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in ("data", "ops", "kernels", "hf", "training"):
        return importlib.import_module(f"llm2vec_fast.{name}")
    raise AttributeError(f"module 'llm2vec_fast' has no attribute {name!r}")


def __dir__():
    return __all__

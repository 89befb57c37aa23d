"""Loader of the optional CUDA C++ extension (csrc/) and its autograd wrapper.

Shape letters: ``B`` texts, ``T`` tokens, ``C`` hidden size.

The extension is found once, in this order: the prebuilt ``llm2vec_fast._C`` (``pip install``
with ``LLM2VEC_FAST_BUILD_CUDA=1``), else a JIT build of ``csrc/bindings.cpp`` + ``csrc/pool.cu``
with ninja through ``torch.utils.cpp_extension.load`` on the first call on a CUDA machine
(cached in torch's extensions directory). :func:`cuda_ext_available` answers whether it can
run; it never raises, and the dispatcher in ``llm2vec_fast/ops`` decides what to do when it
cannot. Importing this module builds nothing and never touches CUDA.
"""
from __future__ import annotations

import functools
import os
import threading

import torch

from .reference import POOLING_MODES

_MODE_IDS = {"mean": 0, "weighted_mean": 1, "last_token": 2, "eos_token": 2, "bos_token": 3}
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
_LOCK = threading.Lock()
_ERROR: str | None = None

try:  # the prebuilt extension, if the package was installed with LLM2VEC_FAST_BUILD_CUDA=1
    from .. import _C as _PREBUILT  # type: ignore[attr-defined]

    HAS_CUDA_EXT = True
except Exception:  # pragma: no cover - depends on the install
    _PREBUILT = None
    HAS_CUDA_EXT = False


def _jit_build():
    from torch.utils.cpp_extension import load

    return load(
        name="llm2vec_fast_C",
        sources=[os.path.join(_CSRC, "bindings.cpp"), os.path.join(_CSRC, "pool.cu")],
        # The C++ standard is left to torch's own flags (each torch release picks the one its
        # headers need); the CI compile test checks bindings.cpp with -std=c++20 too.
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        verbose=os.environ.get("LLM2VEC_FAST_VERBOSE_BUILD", "0") == "1",
    )


@functools.cache
def _ext_or_none():
    global _ERROR
    if _PREBUILT is not None:
        return _PREBUILT
    if not torch.cuda.is_available() or torch.version.cuda is None:
        _ERROR = "no CUDA device or a CPU-only torch"
        return None
    if not os.path.exists(os.path.join(_CSRC, "pool.cu")):
        _ERROR = f"csrc/ sources not found at {_CSRC}"
        return None
    with _LOCK:
        try:
            return _jit_build()
        except Exception as e:  # pragma: no cover - needs a CUDA machine without a toolchain
            _ERROR = f"JIT build failed: {type(e).__name__}: {e}"
            return None


def cuda_ext_available() -> bool:
    """True if the CUDA extension is prebuilt or could be JIT-built here (builds it on first ask)."""
    return _ext_or_none() is not None


def cuda_ext_error() -> str | None:
    """Why :func:`cuda_ext_available` is False (None when it is True or was never asked)."""
    return _ERROR


def get_ext():
    ext = _ext_or_none()
    if ext is None:
        raise RuntimeError(f"llm2vec_fast CUDA extension unavailable: {_ERROR}")
    return ext


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _region(hidden, attention_mask, embed_mask, cu_seqlens):
    """uint8 pooled region, or an empty tensor meaning 'every token of the text'."""
    if cu_seqlens is not None:
        m = embed_mask
    else:
        m = attention_mask if embed_mask is None else (attention_mask.to(torch.bool) & embed_mask.to(torch.bool))
    if m is None:
        return torch.empty(0, device=hidden.device, dtype=torch.uint8)
    if m.dtype != torch.bool:
        m = m != 0
    return m.to(device=hidden.device).contiguous().view(torch.uint8)


class PoolCUDAFunction(torch.autograd.Function):
    """hidden -> pooled (and optionally L2-normalised) ``(B, C)`` through csrc/pool.cu."""

    @staticmethod
    def forward(ctx, hidden, region, cu, mode_id, normalize, out_f32):
        ext = get_ext()
        if hidden.stride(-1) != 1:
            hidden = hidden.contiguous()
        with torch.cuda.device(hidden.device):
            out, e, rnorm, den, sel = ext.pool_forward(hidden, region, cu, mode_id, normalize, out_f32, _stream(hidden.device))
        ctx.save_for_backward(e, rnorm, den, sel, region, cu)
        ctx.cfg = (list(hidden.shape), _DTYPE_CODES[hidden.dtype], mode_id, normalize)
        return out

    @staticmethod
    def backward(ctx, g):
        e, rnorm, den, sel, region, cu = ctx.saved_tensors
        shape, dcode, mode_id, normalize = ctx.cfg
        ext = get_ext()
        with torch.cuda.device(g.device):
            dh = ext.pool_backward(g.contiguous(), e, rnorm, den, sel, region, cu, shape, dcode, mode_id, normalize,
                                   _stream(g.device))
        return dh, None, None, None, None, None


def pool_cuda(hidden, attention_mask, embed_mask, mode, *, cu_seqlens=None, normalize=False, out_dtype=None):
    """Masked pooling through the CUDA extension; same contract as ``pool_triton``.

    hidden ``(B, T, C)`` or packed ``(total, C)`` CUDA fp32 / fp16 / bf16; attention_mask
    ``(B, T)`` (None when packed); embed_mask ``(B, T)`` / ``(total,)`` or None; cu_seqlens
    ``(B+1,)`` int32. Returns ``(B, C)`` in ``out_dtype`` (None: hidden's dtype; any other
    dtype is cast from the kernel's unrounded fp32), summed in fp32, differentiable. Raises RuntimeError if the
    extension is unavailable (the dispatcher checks :func:`cuda_ext_available` first).
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"mode: expected one of {list(POOLING_MODES)}, got {mode!r}")
    region = _region(hidden, attention_mask, embed_mask, cu_seqlens)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=hidden.device, dtype=torch.int32).contiguous()
    else:
        cu = torch.empty(0, device=hidden.device, dtype=torch.int32)
    # fp32 out of the kernel unless hidden's own dtype is asked for (fp64 is not rounded to 16 bits first)
    out_f32 = hidden.dtype == torch.float32 or (out_dtype is not None and out_dtype != hidden.dtype)
    out = PoolCUDAFunction.apply(hidden, region, cu, _MODE_IDS[mode], bool(normalize), bool(out_f32))
    return out if out_dtype is None else out.to(out_dtype)

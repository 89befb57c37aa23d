"""Non-causal (bidirectional) attention: public functions and backend dispatch.

Shapes: ``B`` batch, ``S`` tokens per padded sequence, ``H`` query heads, ``Hkv``
key/value heads (``H % Hkv == 0``; query head ``h`` reads K/V head ``h // (H // Hkv)``),
``D`` head dim.
"""
from __future__ import annotations

import math

import torch

from .._tensor_cache import new_generation
from .._validation import check_cu_seqlens, check_same, check_tensor
from ..kernels import reference as ref
from ._dispatch import resolve_backend, warn_once

_BACKENDS = ("torch", "triton", "flash_attn")


def _check_heads(q, k, v, head_axis: int):
    check_tensor("q", q, float_=True)
    check_tensor("k", k, ndims=q.dim(), float_=True)
    check_tensor("v", v, ndims=q.dim(), float_=True)
    check_same("q", q, "k", k)
    check_same("q", q, "v", v)
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k: expected head dim {q.shape[-1]} (q's last dim), got {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError(f"q: expected a head dim D > 0 (the last dim), got shape {tuple(q.shape)}")
    H, Hkv = q.shape[head_axis], k.shape[head_axis]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"k: number of K/V heads {Hkv} must divide the number of query heads {H} (H % Hkv == 0)")


def _check_scalars(softmax_scale, softcap, dropout_p):
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and 0 < softmax_scale < math.inf):
        raise ValueError(f"softmax_scale: expected a finite float > 0 or None, got {softmax_scale!r}")
    if not (isinstance(softcap, (int, float)) and 0 <= softcap < math.inf):
        raise ValueError(f"softcap: expected a finite float >= 0 (0 = off), got {softcap!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")


def _triton_or_fallback(op: str, q, softcap, dropout_p):
    """The Triton module, or None with a one-time warning when the case is unsupported there."""
    try:
        from ..kernels.triton import attention as tk
    except ImportError as e:  # pragma: no cover - kernels missing from the install
        warn_once(f"{op}-import", f"{op}: Triton attention unavailable ({e}); using the reference")
        return None
    reason = tk.unsupported_reason(q, softcap=softcap, dropout_p=dropout_p)
    if reason is not None:
        warn_once(f"{op}-{reason}", f"{op}: the Triton kernel does not support {reason}; using the reference")
        return None
    return tk


def flash_attn_varlen_noncausal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    backend: str = "auto",
    *,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    deterministic: bool = False,
    _check_values: bool = True,
    _in_model: bool = False,
):
    """Bidirectional attention over packed variable-length sequences (flash-attn's varlen layout).

    Args:
        q: ``(total_q, H, D)`` fp16 / bf16 / fp32 (fp64 on the torch backend).
        k, v: ``(total_k, Hkv, D)``, q's dtype and device, ``H % Hkv == 0``.
        cu_seqlens_q, cu_seqlens_k: ``(B+1,)`` int32 offsets, starting at 0, non-decreasing,
            ending at ``total_q`` / ``total_k``.
        max_seqlen_q, max_seqlen_k: Python ints, the longest sequence (an upper bound is fine;
            one below the longest is refused, the kernels' grid would not cover it).
        softmax_scale: defaults to ``1 / sqrt(D)``.
        softcap: ``softcap * tanh(s / softcap)`` on the scaled scores when > 0 (Gemma2).
        backend: ``"auto"`` (Triton on CUDA, the reference elsewhere), ``"torch"``,
            ``"triton"`` or ``"flash_attn"`` (when importable).
        dropout_p: attention-probability dropout (training), in ``[0, 1)``. On the Triton
            backend the kernels drop in place (a Philox mask keyed by a seed drawn from
            torch's generator of q's device on each call, regenerated in the backward; the
            lse stays that of the undropped softmax); the torch backend uses
            ``F.dropout`` / SDPA's dropout. Either way ``torch.manual_seed`` reproduces it.
        return_lse: also return the log-sum-exp ``(H, total_q)`` fp32, without gradient (as
            flash-attn's): gradients flow through the output only.
        deterministic: Triton backward without atomics (bit-reproducible) even where
            ``LLM2VEC_FAST_ATTN_BWD`` asks for the atomic one (the default backward is
            already deterministic); flash-attn's own deterministic mode.

    Returns:
        ``(total_q, H, D)`` in q's dtype (and the lse when asked). A sequence with no key
        gives zeros, never NaN.

    Raises ``ValueError`` for wrong ranks, mismatched shapes / dtypes / devices,
    ``H % Hkv != 0`` or ``cu_seqlens`` that are not int32, not monotonic or disagree with
    the tensors. Checking the offsets reads them (a host sync on CUDA; skipped inside
    ``torch.compile``, where the offsets are trusted as given).
    """
    if not _in_model:  # (a patched model's layers share its forward's generation)
        # a direct call: nothing derived from an inference-mode mask before is trusted (inside
        # torch.compile this does nothing; the Triton custom op starts the generation at run time)
        new_generation()
    check_tensor("q", q, ndims=3)
    _check_heads(q, k, v, head_axis=1)
    # Reading the offsets is a host sync, and a data-dependent guard that breaks a
    # torch.compile(fullgraph=True) graph: skipped while compiling (shapes are still checked).
    _check_values = _check_values and not torch.compiler.is_compiling()
    longest_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], check_values=_check_values)
    longest_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], check_values=_check_values)
    for name, c in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if c.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (q's), got {c.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_k: expected the shape of cu_seqlens_q {tuple(cu_seqlens_q.shape)} (same batch), "
            f"got {tuple(cu_seqlens_k.shape)}"
        )
    for name, m, longest in (("max_seqlen_q", max_seqlen_q, longest_q), ("max_seqlen_k", max_seqlen_k, longest_k)):
        if not isinstance(m, int) or m < 0:
            raise ValueError(f"{name}: expected a Python int >= 0, got {m!r}")
        if longest is not None and m < longest:
            raise ValueError(f"{name}: expected at least the longest sequence ({longest} tokens), got {m}")
    _check_scalars(softmax_scale, softcap, dropout_p)
    be = resolve_backend("flash_attn_varlen_noncausal", backend, q, allowed=_BACKENDS)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if be == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p,
            softmax_scale=scale, causal=False, softcap=softcap, return_attn_probs=return_lse,
            deterministic=deterministic,
        )
        return (out[0], out[1].detach()) if return_lse else out  # flash-attn's lse: no gradient either
    if be == "triton":
        tk = _triton_or_fallback("flash_attn_varlen_noncausal", q, softcap, dropout_p)
        if tk is not None:
            return tk.flash_attn_varlen_triton(
                q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, softcap,
                dropout_p=dropout_p, return_lse=return_lse, deterministic=deterministic, fresh=not _in_model,
            )
    out = ref.attention_varlen_ref(
        q, k, v, cu_seqlens_q, cu_seqlens_k, scale, softcap, dropout_p, upcast=True, return_lse=return_lse
    )
    return (out[0], out[1].detach()) if return_lse else out  # the lse has no gradient on any backend


def flash_attn_noncausal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    backend: str = "auto",
    *,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    deterministic: bool = False,
    _in_model: bool = False,
):
    """Bidirectional attention over a padded batch with any padding pattern.

    Args:
        q: ``(B, S, H, D)``; k, v: ``(B, S, Hkv, D)`` with q's dtype and device.
        key_padding_mask: ``(B, S)`` bool (or 0/1 integers), True = valid token; left,
            right or arbitrary padding. None = every token valid. With left / right
            padding, whatever q, k, v and the upstream gradient hold at padded positions
            (NaN included) never reaches valid tokens' outputs or gradients on the Triton
            backend, and the gradients at padded positions are 0; padding inside a row
            (holes) must hold finite values, since its rows enter the fused matmuls with
            zero weight (masking them there cost the general kernels registers: measured,
            not kept).
        softmax_scale, softcap, backend, dropout_p, deterministic: as in
            :func:`flash_attn_varlen_noncausal`.
        return_lse: also return the log-sum-exp ``(B, H, S)`` fp32 (``-inf`` on padding),
            without gradient, as in :func:`flash_attn_varlen_noncausal`.

    Returns:
        ``(B, S, H, D)`` in q's dtype; padded query rows are 0, never NaN.
    """
    if not _in_model:
        new_generation()  # as in flash_attn_varlen_noncausal
    check_tensor("q", q, ndims=4)
    _check_heads(q, k, v, head_axis=2)
    if k.shape[:2] != q.shape[:2]:
        raise ValueError(f"k: expected batch and length {tuple(q.shape[:2])} (q's), got {tuple(k.shape[:2])}")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndims=2)
        if key_padding_mask.shape != q.shape[:2]:
            raise ValueError(
                f"key_padding_mask: expected shape {tuple(q.shape[:2])} (B, S), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.dtype.is_floating_point:
            raise ValueError(f"key_padding_mask: expected a bool or integer 0/1 tensor, got {key_padding_mask.dtype}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: expected device {q.device}, got {key_padding_mask.device}")
    _check_scalars(softmax_scale, softcap, dropout_p)
    be = resolve_backend("flash_attn_noncausal", backend, q, allowed=("torch", "triton"))
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if be == "triton":
        tk = _triton_or_fallback("flash_attn_noncausal", q, softcap, dropout_p)
        if tk is not None:
            return tk.flash_attn_padded_triton(
                q, k, v, key_padding_mask, scale, softcap, dropout_p=dropout_p, return_lse=return_lse,
                deterministic=deterministic, fresh=not _in_model,
            )
    if not return_lse and not softcap and q.dtype != torch.float64:
        # SDPA (fused on CPU) with a boolean padding mask: the fast reference path.
        return ref.attention_padded_sdpa(q, k, v, key_padding_mask, scale, dropout_p)
    out = ref.attention_padded_ref(
        q, k, v, key_padding_mask, scale, softcap, dropout_p, upcast=True, return_lse=return_lse
    )
    return (out[0], out[1].detach()) if return_lse else out  # the lse has no gradient on any backend

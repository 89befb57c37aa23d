"""The attention function and mask function registered with transformers under ``"llm2vec_fast"``.

Shapes: ``B`` batch, ``S`` query tokens, ``Sk`` key tokens, ``H`` query heads, ``Hkv``
key/value heads, ``D`` head dim, ``N`` valid tokens.

Transformers' calling convention (``integrations/sdpa_attention.py``): the attention
function receives the attention module, ``query (B, H, S, D)``, ``key`` / ``value``
``(B, Hkv, Sk, D)``, whatever the mask function returned, ``dropout``, ``scaling`` and
model-specific keywords (``softcap`` for Gemma2, ``sliding_window``, ``position_ids``,
``cu_seq_lens_q`` ...), and returns ``(out (B, S, H, D), None)``.

Every call is bidirectional: the causal flag of the module and the causal / sliding mask
function transformers chose are ignored on purpose. Sliding-window configs (Mistral,
Qwen2, Gemma2, Phi3) get full bidirectional attention, as the original LLM2Vec did.
"""
from __future__ import annotations

import math

import torch

from ..ops._dispatch import resolve_backend, warn_once
from .padding import PaddingInfo, packed_from_position_ids, padding_info

NAME = "llm2vec_fast"
# Set on every attention module by patch_model: which backend that model asked for.
BACKEND_ATTR = "llm2vec_fast_backend"
_BACKENDS = ("torch", "triton", "flash_attn")


def llm2vec_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """Mask function for ``AttentionMaskInterface``: a padding-only mask, whatever was asked.

    ``attention_mask`` is transformers' 2-d ``(B, kv_length)`` bool mask (or None). Returns
    None without a mask (every token valid, or packing described by ``position_ids`` /
    ``cu_seq_lens_*``), else the cached :class:`PaddingInfo`, built once per forward and
    shared by all layers (full and sliding layers receive the same object).
    """
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] != kv_length:
        attention_mask = attention_mask[:, -kv_length:]
    return padding_info(attention_mask)


def _general(q, k, v, key_mask, scale, softcap, dropout_p):
    """Eager fallback for what the fast paths do not cover: a 4-d custom mask or ``S != Sk``.

    q ``(B, S, H, D)``, k / v ``(B, Sk, Hkv, D)``; ``key_mask`` None, ``(B, Sk)`` bool, or a
    4-d ``(B or 1, 1 or H, S, Sk)`` bool (True = attend) or additive float mask.
    Computes in fp32 (fp64 stays fp64), GQA by grouping, never repeating K/V.
    """
    B, S, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.to(cdt).permute(0, 2, 1, 3).reshape(B, Hkv, G, S, D)
    kh, vh = k.to(cdt).permute(0, 2, 1, 3), v.to(cdt).permute(0, 2, 1, 3)
    s = torch.einsum("bkgqd,bksd->bkgqs", qh, kh) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.reshape(B, H, S, Sk)
    if key_mask is not None:
        if key_mask.dim() == 2:
            key_mask = key_mask[:, None, None, :]
        if key_mask.dtype == torch.bool:
            s = s.masked_fill(~key_mask, float("-inf"))
        else:
            s = s + key_mask.to(cdt)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no key attends nowhere: 0, not NaN
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, p=dropout_p, training=True)
    o = torch.einsum("bkgqs,bksd->bkgqd", p.reshape(B, Hkv, G, S, Sk), vh).reshape(B, H, S, D)
    return o.permute(0, 2, 1, 3).to(q.dtype)


def llm2vec_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,  # ignored: bidirectional full attention (module docstring)
    **kwargs,
):
    """Bidirectional attention for a patched transformers model (see the module docstring).

    Args:
        module: the attention module; its ``llm2vec_fast_backend`` attribute (set by
            ``patch_model``) picks the backend (``"auto"`` when absent).
        query: ``(B, H, S, D)``; key, value: ``(B, Hkv, Sk, D)``, fp16 / bf16 / fp32 / fp64.
        attention_mask: a :class:`PaddingInfo`, None, a ``(B, Sk)`` 2-d mask or a custom
            4-d mask (the latter runs an eager fallback with a one-time warning).
        dropout: attention-probability dropout (nonzero only in training); the Triton
            backend drops inside its kernels, the eager fallback with ``F.dropout``.
        scaling: softmax scale (defaults to ``1/sqrt(D)``); softcap: Gemma2's score softcap.
        kwargs: ``position_ids (B or 1, S)`` (packed rows when positions restart) and
            ``cu_seq_lens_q / cu_seq_lens_k (n + 1,)``, ``max_length_q / max_length_k``
            (padding-free batches with ``B == 1``).

    Returns:
        ``(out (B, S, H, D) in query's dtype, None)``; padded query rows are 0.
    """
    from ..ops.attention import flash_attn_noncausal, flash_attn_varlen_noncausal

    B, H, S, D = query.shape
    Sk = key.shape[2]
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
    softcap = float(softcap) if softcap else 0.0
    dropout = float(dropout or 0.0)
    backend = getattr(module, BACKEND_ATTR, "auto")
    be = resolve_backend("patch_model attention", backend, query, allowed=_BACKENDS)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D) views
    dev = query.device.type
    if torch.is_autocast_enabled(dev):
        # Under autocast the rotary embedding returns fp32 q/k while v comes from an autocast
        # matmul: run attention in the autocast dtype, as SDPA does under autocast.
        dt = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    elif not (q.dtype == k.dtype == v.dtype):
        q, k = q.to(v.dtype), k.to(v.dtype)

    if S != Sk:
        # A KV cache: the cached tokens were computed without the new ones, which a
        # bidirectional model's tokens must see; a cached step silently differed from running
        # the whole sequence (generate() picked other tokens).
        raise ValueError(
            f"use_cache: a model patched by llm2vec_fast is bidirectional, and decoding with a KV cache "
            f"(query length {S} < key length {Sk}) cannot give its result (the cached tokens do not see the "
            f"new ones); run the whole sequence (use_cache=False, e.g. generate(..., use_cache=False)) or "
            f"unpatch_model() for causal decoding")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        attention_mask = padding_info(attention_mask)
    if isinstance(attention_mask, torch.Tensor):
        # A caller-built 4-d mask is honoured as given (it may not be padding-only).
        warn_once(
            "hf-general",
            "llm2vec_fast attention: a custom 4-d mask runs the eager reference attention, not the fast kernels",
        )
        km = attention_mask
        if isinstance(km, PaddingInfo):
            km = km.mask
        return _general(q, k, v, km, scale, softcap, dropout), None

    def varlen(qp, kp, vp, cu, max_len):
        return flash_attn_varlen_noncausal(
            qp, kp, vp, cu, cu, max_len, max_len, scale, softcap, be, dropout_p=dropout, _check_values=False,
            _in_model=True,
        )

    # 1. Padding-free batches described by transformers' flash-attention keywords.
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        if B != 1:
            raise ValueError(f"cu_seq_lens_q: packed (padding-free) input needs batch size 1, got query batch {B}")
        cu = cu_q.to(torch.int32)
        max_len = kwargs.get("max_length_q")
        max_len = int(max_len) if max_len is not None else int((cu[1:] - cu[:-1]).max())
        return varlen(q[0], k[0], v[0], cu, max_len).unsqueeze(0), None

    info = attention_mask if isinstance(attention_mask, PaddingInfo) else None
    # 2. A padded batch.
    if info is not None and info.has_padding:
        if be in ("torch", "triton"):
            # The padded layout, read in place: the Triton kernel takes transformers' (B, S, H, D)
            # views by strides and skips padded blocks, so no gather / scatter of q, k, v and the
            # output per layer; on the reference backend this is SDPA with a boolean mask.
            # Padded query rows are 0, as on the varlen path.
            out = flash_attn_noncausal(q, k, v, info.mask, scale, softcap, be, dropout_p=dropout, _in_model=True)
            return out, None
        out = varlen(info.unpad(q), info.unpad(k), info.unpad(v), info.cu_seqlens, info.max_seqlen)
        return info.pad(out), None

    # 3. Packed rows: positions restart inside a row.
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == S:
        packed = packed_from_position_ids(position_ids, B)
        if packed is not None:
            cu, max_len = packed
            flat = lambda t: t.reshape(B * S, t.shape[2], D)  # noqa: E731 - copies the transposed view once
            return varlen(flat(q), flat(k), flat(v), cu, max_len).reshape(B, S, H, D), None

    # 4. Dense: every token valid, one sequence per row.
    if be == "flash_attn":
        cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=q.device)
        flat = lambda t: t.reshape(B * S, t.shape[2], D)  # noqa: E731
        return varlen(flat(q), flat(k), flat(v), cu, S).reshape(B, S, H, D), None
    return flash_attn_noncausal(q, k, v, None, scale, softcap, be, dropout_p=dropout, _in_model=True), None


_REGISTERED = [False]


def register() -> None:
    """Register the pair under ``"llm2vec_fast"`` (idempotent; public transformers API only)."""
    if _REGISTERED[0]:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, llm2vec_attention)
    AttentionMaskInterface.register(NAME, llm2vec_mask)
    _REGISTERED[0] = True

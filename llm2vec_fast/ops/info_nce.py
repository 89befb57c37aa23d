"""Pooling and pooled InfoNCE (SimCSE / supervised contrastive loss).

Shapes: ``B`` batch (texts), ``T`` tokens, ``C`` hidden size, ``M`` hard negatives.
"""
from __future__ import annotations

import torch

from .._validation import check_choice, check_cu_seqlens, check_tensor
from ..kernels import reference as ref
from ._dispatch import resolve_backend, warn_once

POOLING_MODES = ref.POOLING_MODES
_BACKENDS = ("torch", "triton", "cuda")


def _check_pool_args(prefix, hidden, attention_mask, embed_mask, cu_seqlens, mode=None):
    hn = f"hidden{prefix}"
    check_tensor(hn, hidden, ndims=(2, 3), float_=True)
    if mode is not None:
        check_choice("mode" if not prefix else "pooling", mode, POOLING_MODES)
    if cu_seqlens is not None:
        if hidden.dim() != 2:
            raise ValueError(f"{hn}: packed input (cu_seqlens given) expects (total, C), got {tuple(hidden.shape)}")
        check_cu_seqlens(f"cu_seqlens{prefix}", cu_seqlens, hidden.shape[0])
        if embed_mask is not None and embed_mask.shape != hidden.shape[:1]:
            raise ValueError(f"embed_mask{prefix}: expected shape ({hidden.shape[0]},), got {tuple(embed_mask.shape)}")
        return
    if hidden.dim() != 3:
        raise ValueError(f"{hn}: expected (B, T, C) (or (total, C) with cu_seqlens), got {tuple(hidden.shape)}")
    mname = f"mask{prefix}" if prefix else "attention_mask"
    if attention_mask is None:
        raise ValueError(f"{mname}: expected a (B, T) mask for padded input, got None")
    check_tensor(mname, attention_mask, ndims=2)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"{mname}: expected shape {tuple(hidden.shape[:2])} (B, T), got {tuple(attention_mask.shape)}")
    if embed_mask is not None:
        check_tensor(f"embed_mask{prefix}", embed_mask, ndims=2)
        if embed_mask.shape != hidden.shape[:2]:
            raise ValueError(f"embed_mask{prefix}: expected shape {tuple(hidden.shape[:2])}, got {tuple(embed_mask.shape)}")


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    embed_mask: torch.Tensor | None = None,
    mode: str = "mean",
    *,
    cu_seqlens: torch.Tensor | None = None,
    normalize: bool = False,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pool token states into one vector per text.

    Args:
        hidden: ``(B, T, C)`` padded, or ``(total, C)`` packed with ``cu_seqlens``.
        attention_mask: ``(B, T)`` bool / 0-1, True = token (either padding side); None for packed.
        embed_mask: ``(B, T)`` (``(total,)`` packed), 1 = pooled token, 0 = instruction token
            (attended to, excluded from the vector).
        mode: ``mean``, ``weighted_mean`` (weights 1..n), ``last_token`` / ``eos_token``
            (last pooled token), ``bos_token`` (first pooled token).
        cu_seqlens: ``(B+1,)`` int32 offsets of packed input.
        normalize: L2-normalise the result.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        out_dtype: the result's floating dtype; None = hidden's. ``torch.float32`` keeps
            the fp32 sums of 16-bit hidden states unrounded (GradCache's embeddings).

    Returns ``(B, C)`` in ``out_dtype``, summed in fp32 (fp64 for fp64 input). A text with
    no pooled token gives the zero vector (documented; no NaN, no host sync to detect it).
    """
    _check_pool_args("", hidden, attention_mask, embed_mask, cu_seqlens, mode)
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype: expected None or a floating torch.dtype, got {out_dtype!r}")
    want = out_dtype or hidden.dtype
    be = resolve_backend("pool", backend, hidden, allowed=_BACKENDS)
    if be == "triton":
        try:
            from ..kernels.triton import info_nce as tk
        except ImportError as e:  # pragma: no cover
            warn_once("pool-import", f"pool: Triton kernel unavailable ({e}); using the reference")
            tk = None
        if tk is not None and hidden.dtype != torch.float64:
            return tk.pool_triton(hidden, attention_mask, embed_mask, mode, cu_seqlens=cu_seqlens,
                                  normalize=normalize, out_dtype=want)
    if be == "cuda":
        ck = _cuda_kernels(hidden, "pool")
        if ck is not None:
            return ck.pool_cuda(hidden, attention_mask, embed_mask, mode, cu_seqlens=cu_seqlens, normalize=normalize,
                                out_dtype=torch.float32 if want != hidden.dtype else None).to(want)
    acc = torch.float64 if torch.float64 in (hidden.dtype, want) else torch.float32
    out = ref.pool_ref(hidden, attention_mask, embed_mask, mode, cu_seqlens=cu_seqlens, out_dtype=acc)
    if normalize:
        out = torch.nn.functional.normalize(out, dim=-1)
    return out.to(want)


def _cuda_kernels(hidden, op):
    """The CUDA extension's loader if it can run this input, else None after a one-time warning."""
    from ..kernels import cuda as ck

    if hidden.dtype == torch.float64:
        warn_once(f"{op}-cuda-fp64", f"{op}: the CUDA kernels take fp32/fp16/bf16, got fp64; using the reference")
        return None
    if not ck.cuda_ext_available():
        warn_once(f"{op}-cuda", f"{op}: CUDA extension unavailable ({ck.cuda_ext_error()}); using the reference")
        return None
    return ck


def _triton_kernels():
    try:
        from ..kernels.triton import info_nce as tk
    except ImportError:  # pragma: no cover
        return None
    return tk


def _check_emb(name, e, C=None):
    check_tensor(name, e, ndims=2, float_=True)
    if C is not None and e.shape[1] != C:
        raise ValueError(f"{name}: expected {C} columns (emb_q's), got shape {tuple(e.shape)}")


def _check_loss_args(temperature, batch, name="emb_q"):
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected a float > 0, got {temperature!r}")
    if batch < 1:
        raise ValueError(f"{name}: expected at least one row, got {batch}")


def info_nce(
    emb_q: torch.Tensor,
    emb_d: torch.Tensor,
    emb_neg: torch.Tensor | None = None,
    *,
    temperature: float = 0.05,
    symmetric: bool = False,
    cross_rank: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """InfoNCE with in-batch negatives on L2-normalised embeddings (cosine similarity).

    Args:
        emb_q: ``(B, C)`` queries; emb_d: ``(B, C)``, row i the positive of query i.
        emb_neg: ``(M, C)`` hard negatives, scored as extra columns.
        temperature: logits are ``cos / temperature`` (0.05 = scale 20).
        symmetric: average with the document->query direction.
        cross_rank: with an initialised ``torch.distributed`` group, score against the
            documents of every rank (gradients flow back to the local shard). Every rank
            must pass the same number of queries and of hard negatives (an all-gather; the
            trainer's batches do); different counts raise ``ValueError`` on every rank (one
            small all-gather of the counts and a host read per call check it). Without an
            initialised group (or with one rank) the loss is the local one; with
            ``WORLD_SIZE`` > 1 in the environment but no group, a one-time warning says so.

    Returns the mean loss, a 0-d fp32 tensor (fp64 for fp64 embeddings).
    """
    _check_emb("emb_q", emb_q)
    _check_emb("emb_d", emb_d, emb_q.shape[1])
    if emb_d.shape[0] != emb_q.shape[0]:
        raise ValueError(f"emb_d: expected {emb_q.shape[0]} rows (one positive per query), got {emb_d.shape[0]}")
    if emb_neg is not None:
        _check_emb("emb_neg", emb_neg, emb_q.shape[1])
    _check_loss_args(temperature, emb_q.shape[0])
    be = resolve_backend("info_nce", backend, emb_q, allowed=_BACKENDS)
    # The CUDA extension holds pooling only: its loss is the Triton one.
    if be in ("triton", "cuda") and emb_q.dtype != torch.float64:
        if cross_rank:
            warn_once("info_nce-cross-rank", "info_nce: cross_rank runs the reference loss (all_gather_with_grad)")
        else:
            tk = _triton_kernels()
            if tk is not None:
                return tk.info_nce_triton(emb_q, emb_d, emb_neg, temperature=temperature, symmetric=symmetric)
    return ref.info_nce_ref(emb_q, emb_d, emb_neg, temperature=temperature, symmetric=symmetric, cross_rank=cross_rank)


def pooled_info_nce(
    hidden_q: torch.Tensor,
    mask_q: torch.Tensor | None,
    hidden_d: torch.Tensor,
    mask_d: torch.Tensor | None,
    *,
    embed_mask_q: torch.Tensor | None = None,
    embed_mask_d: torch.Tensor | None = None,
    hidden_neg: torch.Tensor | None = None,
    mask_neg: torch.Tensor | None = None,
    embed_mask_neg: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_d: torch.Tensor | None = None,
    cu_seqlens_neg: torch.Tensor | None = None,
    temperature: float = 0.05,
    pooling: str = "mean",
    symmetric: bool = False,
    cross_rank: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Pool, normalise, score and take the InfoNCE loss in one call.

    Args:
        hidden_q / hidden_d / hidden_neg: ``(B, T, C)`` padded or ``(total, C)`` packed
            (with the matching ``cu_seqlens_*``); the three may have different T.
        mask_*: ``(B, T)`` attention masks (None for packed input).
        embed_mask_*: tokens that enter the pooled vector (instructions excluded).
        temperature, symmetric, cross_rank: as in :func:`info_nce`; pooling: as ``pool``'s mode.

    Returns the mean loss (0-d fp32). Pooled sums are fp32 whatever the 16-bit / fp32 input
    dtype (fp64 input: fp64 sums and loss).
    """
    check_choice("pooling", pooling, POOLING_MODES)
    _check_pool_args("_q", hidden_q, mask_q, embed_mask_q, cu_seqlens_q)
    _check_pool_args("_d", hidden_d, mask_d, embed_mask_d, cu_seqlens_d)
    if hidden_neg is not None:
        _check_pool_args("_neg", hidden_neg, mask_neg, embed_mask_neg, cu_seqlens_neg)
    Bq = hidden_q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    Bd = hidden_d.shape[0] if cu_seqlens_d is None else cu_seqlens_d.numel() - 1
    if Bq != Bd:
        raise ValueError(f"hidden_d: expected {Bq} texts (one positive per query), got {Bd}")
    for name, h in (("hidden_d", hidden_d), ("hidden_neg", hidden_neg)):
        if h is not None and (h.shape[-1] != hidden_q.shape[-1] or h.dtype != hidden_q.dtype):
            raise ValueError(
                f"{name}: expected hidden size {hidden_q.shape[-1]} and dtype {hidden_q.dtype} (hidden_q's), "
                f"got {h.shape[-1]} and {h.dtype}"
            )
    _check_loss_args(temperature, Bq, "hidden_q")
    be = resolve_backend("pooled_info_nce", backend, hidden_q, allowed=_BACKENDS)
    tk = _triton_kernels() if be in ("triton", "cuda") else None
    ck = _cuda_kernels(hidden_q, "pooled_info_nce") if be == "cuda" else None
    if be == "triton" and tk is not None and not cross_rank and hidden_q.dtype != torch.float64:
        return tk.pooled_info_nce_triton(
            hidden_q, mask_q, hidden_d, mask_d, embed_mask_q=embed_mask_q, embed_mask_d=embed_mask_d,
            hidden_neg=hidden_neg, mask_neg=mask_neg, embed_mask_neg=embed_mask_neg,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_d=cu_seqlens_d, cu_seqlens_neg=cu_seqlens_neg,
            temperature=temperature, pooling=pooling, symmetric=symmetric,
        )
    if (be == "triton" and tk is not None and hidden_q.dtype != torch.float64) or ck is not None:
        # Fast pooling into fp32 embeddings; then the Triton loss, or with cross_rank the
        # reference loss, which gathers every rank's embeddings with all_gather_with_grad.
        if ck is not None:
            p = lambda h, m, e, cu: ck.pool_cuda(h, m, e, pooling, cu_seqlens=cu, out_dtype=torch.float32)  # noqa: E731
        else:
            p = lambda h, m, e, cu: tk._pool_fp32(h, m, e, pooling, cu, False)  # noqa: E731
        eq, ed = p(hidden_q, mask_q, embed_mask_q, cu_seqlens_q), p(hidden_d, mask_d, embed_mask_d, cu_seqlens_d)
        en = p(hidden_neg, mask_neg, embed_mask_neg, cu_seqlens_neg) if hidden_neg is not None else None
        if tk is not None and not cross_rank:
            return tk.info_nce_triton(eq, ed, en, temperature=temperature, symmetric=symmetric)
        return ref.info_nce_ref(eq, ed, en, temperature=temperature, symmetric=symmetric, cross_rank=cross_rank)
    return ref.pooled_info_nce_ref(
        hidden_q, mask_q, hidden_d, mask_d, embed_mask_q=embed_mask_q, embed_mask_d=embed_mask_d,
        hidden_neg=hidden_neg, mask_neg=mask_neg, embed_mask_neg=embed_mask_neg, temperature=temperature,
        pooling=pooling, symmetric=symmetric, cross_rank=cross_rank, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_d=cu_seqlens_d, cu_seqlens_neg=cu_seqlens_neg,
    )

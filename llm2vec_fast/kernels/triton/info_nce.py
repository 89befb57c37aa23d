"""Triton kernels for masked pooling and the InfoNCE (softmax cross-entropy) loss.

Shape letters: ``B`` texts (queries), ``T`` tokens per padded text, ``C`` hidden size,
``M`` hard negatives, ``N = B + M`` similarity columns (world-local), ``NCB`` number of
``BLOCK_C`` column blocks of the hidden size.

Pooling (``_pool_fwd_kernel`` / ``_pool_bwd_kernel``): one program per (text, block of
``BLOCK_C`` channels). The pooled region is ``attention_mask & embed_mask`` (computed once on
the host as a ``(B, T)`` uint8 tensor, ``1/T`` of the hidden traffic); the weights of every
mode are derived in the kernel from it (``weighted_mean``'s 1..n ranks by a running
``tl.cumsum``; ``last``/``bos`` by a scan of the mask and then a single row load), so
nothing of size ``B x T`` beyond the region is materialised. Sums are fp32 whatever the
hidden dtype. The forward writes the fp32 pooled vector ``E (B, C)`` and per-block partial
sums of squares ``(B, NCB)``; the backward writes ``d hidden`` directly in hidden's dtype
(``w_t / den * dE``): no fp32 copy of the hidden states exists at any point.

L2 normalisation (``x / max(||x||, 1e-12)``, F.normalize's definition, fp32): no program of
the ``(B, NCB)`` pooling grid sees a whole row, so the norm comes from the partial sums the
pooling kernel already wrote, and ``_l2norm_fwd_kernel`` (tiles of ``NORM_BLOCK_C``
elements) adds up its rows' partials and scales its tile of ``E`` in place: one read and
one write of ``B x C`` fp32 (``1/T`` of the pooling traffic), no pass to compute norms.
The backward of the normalisation is folded into ``_pool_bwd_kernel``:
``_l2norm_dot_kernel`` first writes per-block partials of ``<E_n, dE_n>`` (two ``B x C``
fp32 reads), then each scatter program adds its row's partials and turns its block of
``dE_n`` into ``(dE_n - E_n <E_n, dE_n>) / ||E||`` (``dE_n / eps`` below eps, where the
clamp passes no gradient) before scattering it to the tokens. No ``(B, C)`` gradient of
the unnormalised ``E`` is materialised and the normalisation adds no autograd op (what
stays at ``B x C`` in autograd is ``pool``'s cast to hidden's dtype and the loss's ``cat``
of documents and negatives), at the price of two small launches each way. The same kernels
normalise raw embeddings for :func:`info_nce_triton` (``_l2norm_ssq_kernel`` computes the
partial sums, ``_l2norm_bwd_kernel`` writes ``d x`` in the input's dtype).

Loss: the similarity ``S = q_n @ [d_n; neg_n]^T`` (fp32, ``B x N``) is one cuBLAS matmul,
then ``_ce_lse_kernel`` computes scaled row log-sum-exps (and, for the symmetric loss,
column log-sum-exps of the ``B x B`` block by running the same kernel on the transposed
strides) and ``_ce_bwd_kernel`` writes ``dS`` in one pass. Why not one fused
similarity+CE kernel (Inf-CL style): for the sizes of LLM2Vec training (``B <= a few
thousand``, ``C <= 4096``) ``S`` is at most tens of MB while the pooled hidden states are
GBs; the matmuls are ``2 B N C`` FLOPs that cuBLAS runs at its fp32 peak (a Triton fp32
``tl.dot`` would need ``input_precision='ieee'`` to stay within the fp32 reference's
tolerance, which runs on CUDA cores at well below cuBLAS speed), and the whole loss is a
few percent of the pooling traffic (see benchmarks/bench_info_nce.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import cdiv, next_power_of_2

POOL_MODE_IDS = {"mean": 0, "weighted_mean": 1, "last_token": 2, "eos_token": 2, "bos_token": 3}

# 32 tokens x 128 channels per tile: 4096 elements over 4 warps (32 per thread) keeps the
# fp32 accumulator and the tile in registers with no spills on sm_80 and sm_90, and the
# (B, C / 128) grid fills an H100 for B >= 64 at C = 4096.
POOL_BLOCK_T = 32
POOL_BLOCK_C = 128
POOL_WARPS = 4
# Loss tiles: 8 rows x 256 columns of fp32 similarities (16 per thread over 4 warps).
CE_BLOCK_R = 8
CE_BLOCK_N = 256
CE_BWD_BLOCK_M = 32
CE_BWD_BLOCK_N = 128
CE_WARPS = 4
# L2 normalisation: tiles of 1024 fp32 elements (8 per thread over 4 warps, two 128-bit
# accesses), 1 row x 1024 channels at LLM sizes or 1024 / C rows when C is smaller, so B x C
# work is a few hundred programs, not tens of thousands of 128-wide ones; a row's partial
# sums are added up 64 at a time (64 / rows per tile when a tile holds several rows).
NORM_BLOCK_C = 1024
NORM_BLOCK_S = 64
NORM_WARPS = 4

# F.normalize's eps, 1e-12, is written out in the kernels (a Triton global must be a constexpr).


# --------------------------------------------------------------------------------------
# L2 normalisation (x / max(||x||, eps), F.normalize's definition) and its backward
# --------------------------------------------------------------------------------------


@triton.jit
def _row_sum(P, row, NCB, BLOCK_S: tl.constexpr):
    """Sum of the ``NCB`` fp32 partials ``P[row, :]`` of a row-major ``(rows, NCB)`` buffer,
    always in the same order (no atomics: the result does not depend on scheduling)."""
    offs = tl.arange(0, BLOCK_S)
    base = P + row.to(tl.int64) * NCB
    acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, NCB, BLOCK_S):
        acc += tl.load(base + s0 + offs, mask=s0 + offs < NCB, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _row_sums(P, offs_r, rm, NCB, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """``_row_sum`` for the ``BLOCK_R`` rows ``offs_r`` (masked by ``rm``): a ``(BLOCK_R,)`` vector."""
    offs = tl.arange(0, BLOCK_S)
    base = P + offs_r.to(tl.int64)[:, None] * NCB
    acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float32)
    for s0 in range(0, NCB, BLOCK_S):
        acc += tl.load(base + (s0 + offs)[None, :], mask=rm[:, None] & (s0 + offs < NCB)[None, :], other=0.0)
    return tl.sum(acc, axis=1)


@triton.jit
def _l2norm_grad(y, dy, dot, nrm):
    """d x of ``y = x / max(||x||, eps)`` from ``y``, ``dy``, ``dot = <y, dy>`` and ``nrm = ||x||``.

    ``||x|| >= eps``: ``(dy - y <y, dy>) / ||x||``. Below eps the divisor is the constant eps
    (``clamp_min`` passes no gradient to the norm), so it is ``dy / eps``: the projection is
    dropped, not the division (a zero row gets ``dy * 1e12``, as with F.normalize).
    """
    proj = tl.where(nrm >= 1e-12, dot, 0.0)
    return tl.div_rn(dy - y * proj, tl.maximum(nrm, 1e-12))


# The normalisation kernels work on (BLOCK_R rows) x (BLOCK_C channels) tiles: one row per
# program at LLM hidden sizes, several when C is small (no grid of thousands of 16-wide programs).


@triton.jit
def _l2norm_ssq_kernel(X, SSQ, R, C, stride_x, NCB, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial sums of squares ``SSQ[r, pc]`` (fp32) of channel block ``pc`` of the rows of ``X``."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pc = tl.program_id(1)
    offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = offs_r < R
    x = tl.load(X + offs_r.to(tl.int64)[:, None] * stride_x + offs_c[None, :],
                mask=rm[:, None] & (offs_c < C)[None, :], other=0.0).to(tl.float32)
    tl.store(SSQ + offs_r * NCB + pc, tl.sum(x * x, axis=1), mask=rm)


@triton.jit
def _l2norm_fwd_kernel(
    X, Y, SSQ, NRM, R, C, stride_x, NCB, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """``Y[r, block] = X[r, block] / max(||X[r]||, eps)`` in fp32, ``||X[r]||^2`` the sum of the
    row's ``NCB`` partials in ``SSQ``; ``NRM[r] = ||X[r]||``. ``X`` may be ``Y`` (in place: each
    element is read and written by the same program). ``Y`` rows are contiguous, stride C."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pc = tl.program_id(1)
    rm = offs_r < R
    nrm = tl.sqrt_rn(_row_sums(SSQ, offs_r, rm, NCB, BLOCK_R, BLOCK_S))
    offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    m = rm[:, None] & (offs_c < C)[None, :]
    r64 = offs_r.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(Y + r64 * C + offs_c[None, :], tl.div_rn(x, tl.maximum(nrm, 1e-12)[:, None]), mask=m)
    if pc == 0:
        tl.store(NRM + offs_r, nrm, mask=rm)


@triton.jit
def _y_dy_tile(Y, DY, R, C, stride_dy, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's ``BLOCK_R x BLOCK_C`` tile of the fp32 normalised ``Y`` (row stride C)
    and of ``DY`` (as fp32), with its row / column offsets and masks."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = offs_r < R
    m = rm[:, None] & (offs_c < C)[None, :]
    r64 = offs_r.to(tl.int64)[:, None]
    y = tl.load(Y + r64 * C + offs_c[None, :], mask=m, other=0.0)
    dy = tl.load(DY + r64 * stride_dy + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
    return offs_r, rm, offs_c, m, r64, y, dy


@triton.jit
def _l2norm_dot_kernel(Y, DY, DOT, R, C, stride_dy, NCB, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial row dots ``DOT[r, pc] = <Y[r, block], DY[r, block]>`` (fp32) for the backward."""
    offs_r, rm, offs_c, m, r64, y, dy = _y_dy_tile(Y, DY, R, C, stride_dy, BLOCK_R, BLOCK_C)
    tl.store(DOT + offs_r * NCB + tl.program_id(1), tl.sum(y * dy, axis=1), mask=rm)


@triton.jit
def _l2norm_bwd_kernel(
    Y, DY, DOT, NRM, DX, R, C, stride_dy, stride_dx, NCB,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """``DX[r, block]`` (in DX's dtype) of the normalisation, from the fp32 output ``Y``."""
    offs_r, rm, offs_c, m, r64, y, dy = _y_dy_tile(Y, DY, R, C, stride_dy, BLOCK_R, BLOCK_C)
    dot = _row_sums(DOT, offs_r, rm, NCB, BLOCK_R, BLOCK_S)
    nrm = tl.load(NRM + offs_r, mask=rm, other=1.0)
    dx = _l2norm_grad(y, dy, dot[:, None], nrm[:, None])
    tl.store(DX + r64 * stride_dx + offs_c[None, :], dx.to(DX.dtype.element_ty), mask=m)


def norm_block_c(C: int) -> int:
    """``NORM_BLOCK_C`` channels per normalisation program; a power of two >= 16 below that."""
    return NORM_BLOCK_C if C >= NORM_BLOCK_C else max(16, next_power_of_2(C))


def _norm_tile(R, C):
    """``(BLOCK_R, BLOCK_C, BLOCK_S, ncb, grid)`` of the normalisation kernels: ``NORM_BLOCK_C``
    elements per tile, as many rows as fit when ``C`` is smaller; the ``BLOCK_R x BLOCK_S``
    tile of row partials stays at ``NORM_BLOCK_S`` elements (a row has at most
    ``C / POOL_BLOCK_C <= 8`` partials when ``BLOCK_R > 1``, still one pass, and 64 rows x 64
    partials would cost 200 registers a thread for nothing)."""
    bc = norm_block_c(C)
    br = NORM_BLOCK_C // bc
    ncb = cdiv(C, bc)
    return br, bc, max(1, NORM_BLOCK_S // br), ncb, (cdiv(R, br), ncb)


def _normalize_rows(x, ssq, out):
    """``out (R, C)`` fp32 = rows of ``x`` over ``max(||row||, eps)``; ``ssq (R, k)`` fp32 holds
    the rows' partial sums of squares (any ``k``). ``out`` may be ``x``. Returns ``nrm (R,)``."""
    R, C = x.shape
    nrm = torch.empty(R, device=x.device, dtype=torch.float32)
    if R > 0 and C > 0:
        br, bc, bs, _, grid = _norm_tile(R, C)
        _l2norm_fwd_kernel[grid](
            x, out, ssq, nrm, R, C, x.stride(0), ssq.shape[1],
            BLOCK_R=br, BLOCK_C=bc, BLOCK_S=bs, num_warps=NORM_WARPS,
        )
    else:
        nrm.zero_()
    return nrm


def _row_dots(y, dy):
    """Partial row dots ``(R, ncb)`` fp32 of ``y (R, C)`` fp32 contiguous and ``dy (R, C)``
    (last dim contiguous); R, C > 0."""
    R, C = y.shape
    br, bc, _, ncb, grid = _norm_tile(R, C)
    dot = torch.empty(R, ncb, device=y.device, dtype=torch.float32)
    _l2norm_dot_kernel[grid](y, dy, dot, R, C, dy.stride(0), ncb, BLOCK_R=br, BLOCK_C=bc, num_warps=NORM_WARPS)
    return dot


def l2norm_forward(x, out=None):
    """``x (R, C)`` (fp32 / fp16 / bf16, any row stride) -> ``y = x / max(||x||, eps)`` fp32
    ``(R, C)`` (into ``out`` when given, contiguous) and ``nrm (R,)`` fp32 row norms (sums of
    squares in fp32)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    R, C = x.shape
    y = out if out is not None else torch.empty(R, C, device=x.device, dtype=torch.float32)
    if R == 0 or C == 0:
        return y, torch.zeros(R, device=x.device, dtype=torch.float32)
    br, bc, _, ncb, grid = _norm_tile(R, C)
    ssq = torch.empty(R, ncb, device=x.device, dtype=torch.float32)
    _l2norm_ssq_kernel[grid](x, ssq, R, C, x.stride(0), ncb, BLOCK_R=br, BLOCK_C=bc, num_warps=NORM_WARPS)
    return y, _normalize_rows(x, ssq, y)


def l2norm_backward(dy, y, nrm, dtype, dx=None):
    """``dx (R, C)`` in ``dtype`` from ``dy (R, C)``, the fp32 output ``y`` (contiguous) and
    ``nrm``. Every element of ``dx`` is written (it may be passed in, e.g. NaN-poisoned)."""
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    R, C = y.shape
    if dx is None:
        dx = torch.empty(R, C, device=y.device, dtype=dtype)
    if R > 0 and C > 0:
        dot = _row_dots(y, dy)
        br, bc, bs, ncb, grid = _norm_tile(R, C)
        _l2norm_bwd_kernel[grid](
            y, dy, dot, nrm, dx, R, C, dy.stride(0), dx.stride(0), ncb,
            BLOCK_R=br, BLOCK_C=bc, BLOCK_S=bs, num_warps=NORM_WARPS,
        )
    return dx


class _L2NormFn(torch.autograd.Function):
    """``x (R, C)`` any float dtype -> fp32 ``x / max(||x||, eps)``; d x in x's dtype."""

    @staticmethod
    def forward(ctx, x):
        y, nrm = l2norm_forward(x)
        ctx.save_for_backward(y, nrm)
        ctx.dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        y, nrm = ctx.saved_tensors
        return l2norm_backward(dy, y, nrm, ctx.dtype)



# --------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------


@triton.jit
def _pool_fwd_kernel(
    H, REG, CU, E, SSQ, DEN, SEL,
    T, C, stride_hb, stride_ht, stride_rb, NCB,
    POOL_MODE: tl.constexpr, PACKED: tl.constexpr, HAS_REG: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    pc = tl.program_id(1)
    offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs_c < C
    if PACKED:
        start = tl.load(CU + b).to(tl.int64)
        L = tl.load(CU + b + 1).to(tl.int64) - start
        h_base = H + start * stride_ht
        r_base = REG + start
    else:
        L = T
        h_base = H + b.to(tl.int64) * stride_hb
        r_base = REG + b.to(tl.int64) * stride_rb
    arange_t = tl.arange(0, BLOCK_T)
    if POOL_MODE <= 1:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        cnt = tl.zeros([BLOCK_T], dtype=tl.float32)  # running region count (broadcast)
        wsum = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, L, BLOCK_T):
            offs_t = t0 + arange_t
            tm = offs_t < L
            if HAS_REG:
                r = tl.load(r_base + offs_t, mask=tm, other=0) != 0
            else:
                r = tm
            rf = r.to(tl.float32)
            if POOL_MODE == 1:
                # weighted_mean: weight = rank 1..n along the region, carried across tiles.
                w = (tl.cumsum(rf, axis=0) + cnt) * rf
                cnt += tl.sum(rf, axis=0)
            else:
                w = rf
            wsum += w
            # Masked-off rows (padding, instruction tokens) are never read from memory.
            h = tl.load(h_base + offs_t[:, None] * stride_ht + offs_c[None, :],
                        mask=r[:, None] & cm[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(h * w[:, None], axis=0)
        den = tl.maximum(tl.sum(wsum, axis=0), 1.0)
        e = acc / den
        sel = tl.max(tl.full([BLOCK_T], -1, dtype=tl.int64), axis=0)  # a scalar -1 (no selected token)
    else:
        # last/eos: the region's last token; bos: its first. Scan the mask, load one row.
        if POOL_MODE == 2:
            best = tl.full([BLOCK_T], -1, dtype=tl.int64)
        else:
            best = tl.full([BLOCK_T], 2**62, dtype=tl.int64)
        for t0 in range(0, L, BLOCK_T):
            offs_t = t0 + arange_t
            tm = offs_t < L
            if HAS_REG:
                r = (tl.load(r_base + offs_t, mask=tm, other=0) != 0) & tm
            else:
                r = tm
            ot = offs_t.to(tl.int64)
            if POOL_MODE == 2:
                best = tl.maximum(best, tl.where(r, ot, -1))
            else:
                best = tl.minimum(best, tl.where(r, ot, 2**62))
        if POOL_MODE == 2:
            sel = tl.max(best, axis=0)
        else:
            sel = tl.min(best, axis=0)
            sel = tl.where(sel == 2**62, -1, sel)
        valid = (tl.zeros([BLOCK_C], dtype=tl.int64) + sel) >= 0  # explicit broadcast for the mask
        e = tl.load(h_base + tl.maximum(sel, 0) * stride_ht + offs_c, mask=cm & valid, other=0.0).to(tl.float32)
        den = 1.0
    tl.store(E + b.to(tl.int64) * C + offs_c, e, mask=cm)
    tl.store(SSQ + b * NCB + pc, tl.sum(e * e, axis=0))
    if pc == 0:
        tl.store(DEN + b, den)
        tl.store(SEL + b, sel)


@triton.jit
def _pool_bwd_kernel(
    DE, DH, REG, CU, DEN, SEL, EN, DOT, NRM,
    T, C, stride_hb, stride_ht, stride_rb, NCB,
    POOL_MODE: tl.constexpr, PACKED: tl.constexpr, HAS_REG: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    pc = tl.program_id(1)
    offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs_c < C
    if PACKED:
        start = tl.load(CU + b).to(tl.int64)
        L = tl.load(CU + b + 1).to(tl.int64) - start
        h_base = DH + start * stride_ht
        r_base = REG + start
    else:
        L = T
        h_base = DH + b.to(tl.int64) * stride_hb
        r_base = REG + b.to(tl.int64) * stride_rb
    g = tl.load(DE + b.to(tl.int64) * C + offs_c, mask=cm, other=0.0)
    if NORMALIZE:
        # DE is the gradient of the normalised EN: the normalisation's backward happens here,
        # on this block of channels, with the row's <EN, DE> summed from NCB partials.
        en = tl.load(EN + b.to(tl.int64) * C + offs_c, mask=cm, other=0.0)
        g = _l2norm_grad(en, g, _row_sum(DOT, b, NCB, BLOCK_S), tl.load(NRM + b))
    # The 1/den of the forward is folded into the per-text gradient once.
    g = g / tl.load(DEN + b)
    sel = tl.load(SEL + b)
    arange_t = tl.arange(0, BLOCK_T)
    cnt = tl.zeros([BLOCK_T], dtype=tl.float32)
    # Every token of the text is written (zeros outside the region): d hidden needs no memset.
    for t0 in range(0, L, BLOCK_T):
        offs_t = t0 + arange_t
        tm = offs_t < L
        if POOL_MODE <= 1:
            if HAS_REG:
                r = tl.load(r_base + offs_t, mask=tm, other=0) != 0
            else:
                r = tm
            rf = r.to(tl.float32)
            if POOL_MODE == 1:
                w = (tl.cumsum(rf, axis=0) + cnt) * rf
                cnt += tl.sum(rf, axis=0)
            else:
                w = rf
        else:
            w = (offs_t.to(tl.int64) == sel).to(tl.float32)
        # selected, not multiplied by a 0 weight: an inf / NaN gradient of the text (fp16 loss
        # scaling) must not make 0 * inf = NaN at tokens outside its region
        dh = tl.where(w[:, None] != 0, w[:, None] * g[None, :], 0.0)
        tl.store(h_base + offs_t[:, None] * stride_ht + offs_c[None, :], dh.to(DH.dtype.element_ty),
                 mask=tm[:, None] & cm[None, :])


def _region(hidden, attention_mask, embed_mask, cu_seqlens):
    """uint8 pooled-region mask: ``(B, T)`` padded, ``(total,)`` packed, or None (all tokens)."""
    if cu_seqlens is not None:
        m = embed_mask
        if m is None:
            return None
    else:
        m = attention_mask if embed_mask is None else (attention_mask.to(torch.bool) & embed_mask.to(torch.bool))
    if m.dtype != torch.bool:
        m = m != 0
    return m.to(device=hidden.device).contiguous().view(torch.uint8)


def pool_forward(hidden, region, cu_seqlens, mode: str, out: torch.Tensor | None = None, normalize: bool = False):
    """Launch the pooling forward (and, with ``normalize``, the L2 normalisation in place).

    hidden ``(B, T, C)`` (last dim contiguous) or packed ``(total, C)`` with ``cu_seqlens``
    ``(B+1,)`` int32; region uint8 ``(B, T)`` / ``(total,)`` or None. Returns ``E (B, C)``
    fp32 (into ``out`` when given, a row-slice of a larger buffer is fine; divided by
    ``max(||E||, eps)`` when ``normalize``), ``nrm (B,)`` fp32 norms of the pooled vectors
    before normalisation (None without ``normalize``), ``den (B,)`` fp32 pooling
    denominators and ``sel (B,)`` int64 selected token (last/bos modes; -1 = empty region).
    """
    packed = cu_seqlens is not None
    C = hidden.shape[-1]
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if packed:
        B, T = cu_seqlens.numel() - 1, 0
        sb, st = 0, hidden.stride(0)
        rb = 0
    else:
        B, T = hidden.shape[0], hidden.shape[1]
        sb, st = hidden.stride(0), hidden.stride(1)
        rb = region.stride(0) if region is not None else 0
    dev = hidden.device
    block_c = pool_block_c(C)
    ncb = cdiv(C, block_c)
    E = out if out is not None else torch.empty(B, C, device=dev, dtype=torch.float32)
    ssq = torch.empty(B, ncb, device=dev, dtype=torch.float32)
    den = torch.empty(B, device=dev, dtype=torch.float32)
    sel = torch.empty(B, device=dev, dtype=torch.int64)
    dummy = torch.empty(1, device=dev, dtype=torch.int32)
    if B > 0:
        _pool_fwd_kernel[(B, ncb)](
            hidden, region if region is not None else dummy, cu_seqlens if packed else dummy,
            E, ssq, den, sel, T, C, sb, st, rb, ncb,
            POOL_MODE=POOL_MODE_IDS[mode], PACKED=packed, HAS_REG=region is not None,
            BLOCK_T=POOL_BLOCK_T, BLOCK_C=block_c, num_warps=POOL_WARPS,
        )
    # The pooling kernel left per-block partial sums of squares: the norm costs no extra pass
    # over E, and normalising is one read and one write of B x C fp32.
    nrm = _normalize_rows(E, ssq, E) if normalize else None
    return E, nrm, den, sel


def pool_backward(dE, hidden_shape, hidden_dtype, region, cu_seqlens, den, sel, mode: str, dh=None, en=None, nrm=None):
    """d hidden ``hidden_shape`` in ``hidden_dtype`` from ``dE (B, C)`` fp32 (grad of the fp32 pooled E).

    With ``en`` (the normalised ``(B, C)`` fp32 output of ``pool_forward(normalize=True)``) and
    its ``nrm (B,)``, ``dE`` is the gradient of ``en`` and the normalisation's backward is
    applied inside the scatter kernel (after a small kernel of per-block ``<en, dE>``
    partials): no ``(B, C)`` gradient of the unnormalised E is materialised. Every element
    of ``dh`` is written (zeros outside the pooled region), so it is allocated uninitialised
    (or passed in, contiguous, e.g. NaN-poisoned by the tests).
    """
    packed = cu_seqlens is not None
    C = hidden_shape[-1]
    dev = dE.device
    if dh is None:
        dh = torch.empty(hidden_shape, device=dev, dtype=hidden_dtype)
    if packed:
        B, T, sb, st, rb = cu_seqlens.numel() - 1, 0, 0, dh.stride(0), 0
    else:
        B, T, sb, st = hidden_shape[0], hidden_shape[1], dh.stride(0), dh.stride(1)
        rb = region.stride(0) if region is not None else 0
    block_c = pool_block_c(C)
    dummy = torch.empty(1, device=dev, dtype=torch.int32)
    if B > 0 and dh.numel() > 0:
        dE = dE.contiguous()
        normalize = en is not None
        dot = _row_dots(en, dE) if normalize else None
        fdummy = torch.empty(1, device=dev, dtype=torch.float32)
        _pool_bwd_kernel[(B, cdiv(C, block_c))](
            dE, dh, region if region is not None else dummy, cu_seqlens if packed else dummy,
            den, sel, en if normalize else fdummy, dot if normalize else fdummy, nrm if normalize else fdummy,
            T, C, sb, st, rb, dot.shape[1] if normalize else 1,
            POOL_MODE=POOL_MODE_IDS[mode], PACKED=packed, HAS_REG=region is not None, NORMALIZE=normalize,
            BLOCK_T=POOL_BLOCK_T, BLOCK_C=block_c, BLOCK_S=NORM_BLOCK_S, num_warps=POOL_WARPS,
        )
    return dh


def pool_block_c(C: int) -> int:
    """128 channels per program; smaller (power of two >= 16) for tiny test hidden sizes."""
    return POOL_BLOCK_C if C >= POOL_BLOCK_C else max(16, next_power_of_2(C))


class _PoolFn(torch.autograd.Function):
    """hidden -> fp32 pooled ``E (B, C)``, L2-normalised when ``normalize``. Saves the tiny
    per-text state, and with ``normalize`` the fp32 output and its norms (``B x C``)."""

    @staticmethod
    def forward(ctx, hidden, region, cu_seqlens, mode, normalize):
        E, nrm, den, sel = pool_forward(hidden, region, cu_seqlens, mode, normalize=normalize)
        ctx.save_for_backward(region, cu_seqlens, den, sel, E if normalize else None, nrm)
        ctx.cfg = (tuple(hidden.shape), hidden.dtype, mode)
        return E

    @staticmethod
    def backward(ctx, dE):
        region, cu_seqlens, den, sel, en, nrm = ctx.saved_tensors
        shape, dtype, mode = ctx.cfg
        dh = pool_backward(dE.float(), shape, dtype, region, cu_seqlens, den, sel, mode, en=en, nrm=nrm)
        return dh, None, None, None, None


def _pool_fp32(hidden, attention_mask, embed_mask, mode, cu_seqlens, normalize):
    """fp32 ``(B, C)`` pooled (and, with ``normalize``, L2-normalised) embeddings, differentiable."""
    region = _region(hidden, attention_mask, embed_mask, cu_seqlens)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=hidden.device, dtype=torch.int32).contiguous()
    return _PoolFn.apply(hidden, region, cu_seqlens, mode, bool(normalize))


def pool_triton(hidden, attention_mask, embed_mask, mode, *, cu_seqlens=None, normalize=False, out_dtype=None):
    """Masked pooling (every mode) with fp32 sums; see :func:`llm2vec_fast.pool`.

    hidden ``(B, T, C)`` or packed ``(total, C)`` (fp16 / bf16 / fp32), attention_mask
    ``(B, T)`` (None when packed), embed_mask ``(B, T)`` / ``(total,)`` or None,
    cu_seqlens ``(B+1,)`` int32. ``normalize``: divide by ``max(||E||, 1e-12)`` in fp32, in
    Triton (forward and backward). Returns ``(B, C)`` in ``out_dtype`` (None = hidden's
    dtype), differentiable.
    """
    E = _pool_fp32(hidden, attention_mask, embed_mask, mode, cu_seqlens, normalize)
    return E.to(out_dtype or hidden.dtype)


# --------------------------------------------------------------------------------------
# Softmax cross-entropy over a similarity matrix
# --------------------------------------------------------------------------------------


@triton.jit
def _ce_lse_kernel(
    S, LSE, LOSS, R, N, stride_r, stride_n, inv_t,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per row r of ``S * inv_t`` (first N columns): log-sum-exp and ``lse - s[r, r]``."""
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = offs_r < R
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    tgt = tl.zeros([BLOCK_R], dtype=tl.float32)
    base = S + offs_r.to(tl.int64)[:, None] * stride_r
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nm = offs_n < N
        s = tl.load(base + offs_n[None, :] * stride_n, mask=rm[:, None] & nm[None, :], other=0.0) * inv_t
        # Columns past N are -inf (weight 0); rows past R read zeros (finite, never stored).
        s = tl.where(nm[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m = m_new
        tgt += tl.sum(tl.where(offs_n[None, :] == offs_r[:, None], s, 0.0), axis=1)
    lse = m + tl.log(acc)
    tl.store(LSE + offs_r, lse, mask=rm)
    tl.store(LOSS + offs_r, lse - tgt, mask=rm)


@triton.jit
def _ce_bwd_kernel(
    S, DS, LSE_R, LSE_C, G, B, N, stride_s, stride_ds, inv_t, coef_r, coef_c,
    SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dS = g * inv_t * (coef_r (softmax_row - I) + coef_c (softmax_col - I))``, one pass."""
    offs_r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_r < B
    nm = offs_n < N
    msk = rm[:, None] & nm[None, :]
    r64 = offs_r.to(tl.int64)[:, None]
    s = tl.load(S + r64 * stride_s + offs_n[None, :], mask=msk, other=0.0) * inv_t
    g = tl.load(G).to(tl.float32)
    eye = (offs_r[:, None] == offs_n[None, :]).to(tl.float32)
    lse_r = tl.load(LSE_R + offs_r, mask=rm, other=0.0)
    d = coef_r * (tl.exp(s - lse_r[:, None]) - eye)
    if SYMMETRIC:
        cin = offs_n < B
        lse_c = tl.load(LSE_C + offs_n, mask=cin, other=0.0)
        pc = tl.where(cin[None, :], tl.exp(s - lse_c[None, :]), 0.0)
        d += coef_c * (pc - eye)
    tl.store(DS + r64 * stride_ds + offs_n[None, :], d * (g * inv_t), mask=msk)


def ce_forward(S, B, inv_t, symmetric):
    """Row (and, if symmetric, column-of-the-B x B-block) log-sum-exps and per-row losses."""
    N = S.shape[1]
    dev = S.device
    lse_r = torch.empty(B, device=dev, dtype=torch.float32)
    loss_r = torch.empty(B, device=dev, dtype=torch.float32)
    grid = (cdiv(B, CE_BLOCK_R),)
    _ce_lse_kernel[grid](S, lse_r, loss_r, B, N, S.stride(0), S.stride(1), inv_t,
                         BLOCK_R=CE_BLOCK_R, BLOCK_N=CE_BLOCK_N, num_warps=CE_WARPS)
    if not symmetric:
        return loss_r.mean(), lse_r, None
    # Document->query direction: d @ q^T = (q @ d^T)^T, i.e. the columns of the B x B block.
    lse_c = torch.empty(B, device=dev, dtype=torch.float32)
    loss_c = torch.empty(B, device=dev, dtype=torch.float32)
    _ce_lse_kernel[grid](S, lse_c, loss_c, B, B, S.stride(1), S.stride(0), inv_t,
                         BLOCK_R=CE_BLOCK_R, BLOCK_N=CE_BLOCK_N, num_warps=CE_WARPS)
    return 0.5 * (loss_r.mean() + loss_c.mean()), lse_r, lse_c


def ce_backward(g, S, lse_r, lse_c, inv_t, symmetric):
    B, N = S.shape
    dS = torch.empty_like(S)
    w = 0.5 if symmetric else 1.0
    grid = (cdiv(B, CE_BWD_BLOCK_M), cdiv(N, CE_BWD_BLOCK_N))
    _ce_bwd_kernel[grid](
        S, dS, lse_r, lse_c if lse_c is not None else lse_r, g.reshape(1).float(), B, N, S.stride(0), dS.stride(0),
        inv_t, w / B, w / B, SYMMETRIC=symmetric, BLOCK_M=CE_BWD_BLOCK_M, BLOCK_N=CE_BWD_BLOCK_N, num_warps=CE_WARPS,
    )
    return dS


class _SimCEFn(torch.autograd.Function):
    """InfoNCE on already normalised fp32 rows: q ``(B, C)``, cols ``(N, C)`` (first B = positives)."""

    @staticmethod
    def forward(ctx, q, cols, inv_t, symmetric):
        B = q.shape[0]
        with torch.autocast(q.device.type, enabled=False):  # fp32 scores under autocast too
            S = q @ cols.t()  # cuBLAS fp32, (B, N)
        loss, lse_r, lse_c = ce_forward(S, B, inv_t, symmetric)
        ctx.save_for_backward(q, cols, S, lse_r, lse_c)
        ctx.cfg = (inv_t, symmetric)
        return loss

    @staticmethod
    def backward(ctx, g):
        q, cols, S, lse_r, lse_c = ctx.saved_tensors
        inv_t, symmetric = ctx.cfg
        dS = ce_backward(g, S, lse_r, lse_c, inv_t, symmetric)
        with torch.autocast(q.device.type, enabled=False):
            dq = dS @ cols if ctx.needs_input_grad[0] else None
            dcols = dS.t() @ q if ctx.needs_input_grad[1] else None
        return dq, dcols, None, None


def info_nce_triton(emb_q, emb_d, emb_neg=None, *, temperature=0.05, symmetric=False):
    """InfoNCE on embeddings; see :func:`llm2vec_fast.info_nce`.

    emb_q ``(B, C)``, emb_d ``(B, C)``, emb_neg ``(M, C)`` or None, fp32 / fp16 / bf16. Rows are
    L2-normalised in fp32 by the Triton normalisation kernels (gradients come back in each
    input's dtype). Returns the mean loss, a 0-d fp32 tensor; gradients flow to every embedding.
    """
    q = _L2NormFn.apply(emb_q)
    cols = _L2NormFn.apply(emb_d)
    if emb_neg is not None:
        cols = torch.cat([cols, _L2NormFn.apply(emb_neg)], 0)
    return _SimCEFn.apply(q, cols, 1.0 / float(temperature), bool(symmetric))


def pooled_info_nce_triton(
    hidden_q, mask_q, hidden_d, mask_d, *, embed_mask_q=None, embed_mask_d=None, hidden_neg=None,
    mask_neg=None, embed_mask_neg=None, cu_seqlens_q=None, cu_seqlens_d=None, cu_seqlens_neg=None,
    temperature=0.05, pooling="mean", symmetric=False,
):
    """Pool + L2 normalise (fp32, Triton) -> similarity (cuBLAS) -> CE (Triton).

    hidden_* ``(B, T, C)`` padded or ``(total, C)`` packed with ``cu_seqlens_*`` ``(B+1,)``
    int32; ``mask_*`` ``(B, T)``; ``embed_mask_*`` ``(B, T)`` / ``(total,)``. The fp32
    normalised embeddings are kept for the loss (``(B + M) x C`` floats); the hidden states
    are read once in the forward and ``d hidden`` written once, in the input dtype.
    Returns the mean loss, 0-d fp32.
    """
    q = _pool_fp32(hidden_q, mask_q, embed_mask_q, pooling, cu_seqlens_q, True)
    cols = _pool_fp32(hidden_d, mask_d, embed_mask_d, pooling, cu_seqlens_d, True)
    if hidden_neg is not None:
        cols = torch.cat([cols, _pool_fp32(hidden_neg, mask_neg, embed_mask_neg, pooling, cu_seqlens_neg, True)], 0)
    return _SimCEFn.apply(q, cols, 1.0 / float(temperature), bool(symmetric))

"""Non-causal flash attention in Triton: forward, backward, varlen and padded, GQA, softcap.

Shapes: ``B`` batch, ``S`` padded length, ``T`` packed tokens (``total_q`` / ``total_k``),
``H`` query heads, ``Hkv`` key/value heads, ``G = H // Hkv`` query heads per K/V head
(query head ``h`` reads K/V head ``h // G``), ``D`` head dim (32, 64, 80, 96, 128, 256),
``BLOCK_D`` the next power of two of ``D`` (80 and 96 load masked 128-wide blocks).

One kernel family serves both layouts:

- varlen (``IS_VARLEN``): q ``(T_q, H, D)``, k/v ``(T_k, Hkv, D)``, sequence ``b`` spans
  rows ``cu_seqlens[b] : cu_seqlens[b+1]``; lse / delta ``(H, T_q)`` fp32.
- padded: q ``(B, S, H, D)``, k/v ``(B, S, Hkv, D)``, an optional ``(B, S)`` key padding mask
  read directly by the kernels (any holes), plus the per-row ``[lo, hi)`` span of valid
  tokens so left / right padding skips whole blocks; lse / delta ``(B, H, S)`` fp32.

Forward: online softmax in base 2 with fp32 running max / sum / accumulator, the
log-sum-exp saved (natural log). Backward, two strategies (``BWD_MODE``, :func:`bwd_mode`):

- separate (the default): a dQ kernel (which also computes ``delta = rowsum(dO * O)`` and
  the base-2 lse with ``+inf`` for rows without keys, ``LSE2``, so no separate preprocess
  launch and no per-load conversion in the dK/dV loop) and a dK/dV kernel whose program owns one K/V block of
  one K/V head and loops over the query blocks of all ``G`` query heads sharing it: GQA
  gradients are summed in registers, never through repeated K/V or atomics, so this
  backward is deterministic. Both kernels recompute ``P`` and ``dP``: 7 block matmuls per
  (query block, key block) pair.
- atomic: a delta / ``LSE2`` pass (the dQ kernel with ``DELTA_ONLY``), then the same dK/dV kernel
  with ``ATOMIC_DQ``, which also computes each pair's ``dS K`` and adds it into an fp32 dQ
  accumulator with (vectorised) atomics: 5 block matmuls per pair, plus the accumulator's
  memset, atomics and final cast. The summation order of dQ varies from run to run, so ``deterministic=True`` takes
  the separate backward. GPU tiles for 16-bit inputs without dropout at head dims 64-128;
  untimed on a GPU so far, hence not the default.

Measured (H200, bf16, torch 2.11 / triton 3.6, benchmarks/results/attention.jsonl, the
kernels of commit daa7beb): head dim 128 unpadded S = 4k / 8k, H = 32: forward 473 / 482
TFLOP/s (SDPA flash 336 / 328, cuDNN 603 / 613), backward 355 / 369 (flash 294 / 304);
head dim 64: forward 394 / 405, backward 295 / 302. Padded LLM2Vec-like batch (B = 16,
S = 2048, lengths 30-100 %, 32 / 8 heads): forward 315 (varlen entry 401) against
FlexAttention 331 and transformers' SDPA-with-mask 113. The mask-free loops for hole-free
padding came after that run and are not yet measured on a GPU.

Attention dropout (``DROPOUT`` constexpr; the kernels without it compile as before): the
forward multiplies the probabilities of each tile by a keep mask ``Z`` before ``P V`` and
rescales the output by ``1 / (1 - p)``; the saved lse is that of the undropped softmax.
The mask is never stored: each element's bit comes from a Philox-4x32 draw keyed by a
per-call seed (drawn from torch's generator, :func:`dropout_seed`) with counters (key
position, query position // 4, ``b * H + h``), so both backward kernels regenerate it
whatever their tiles: ``dV = (P * Z)^T dO / (1 - p)``, ``dP = Z * (dO V^T) / (1 - p)``,
``dS = P * (dP - delta)`` with the same ``delta = rowsum(dO * O)`` (``O`` being the
dropped output). :func:`dropout_keep_mask` writes the mask out, for tests. Cost: one
10-round Philox evaluation per four probabilities in each of the three kernels, and
dropout has its own tile lists (``DROPOUT_*_CONFIGS``); not yet measured on a GPU.

Sequence order: in the varlen and masked padded layouts the grid's third axis indexes a
permutation of the sequences, longest first (``ORDER``, :func:`_seq_order`), so the GPU, which
starts programs in grid order, starts the longest sequences first; softcapped kernels keep batch
order (see :func:`_sequence`). ``LONGEST_FIRST = False`` passes the identity.

Invariants: a query row with no valid key (empty sequence, fully padded row, a padded
query position) gets output 0 and lse ``-inf``; the backward reads such an lse as ``+inf``
so its probabilities are exactly 0 and no NaN can appear.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..._tensor_cache import cached, is_hole_free, new_generation
from .. import reference as ref
from ._tiles import cdiv, launch_tuned, tile_name

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(q: torch.Tensor, *, softcap: float = 0.0, dropout_p: float = 0.0) -> str | None:
    """A short reason why the Triton kernels cannot run this case, or None when they can.

    Every ``softcap`` and every ``dropout_p`` in ``[0, 1)`` is supported; the keywords stay
    so callers need not know which cases the kernels cover.
    """
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype}"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} (supported: {SUPPORTED_HEAD_DIMS})"
    return None


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): exact limits +-1 when e^{2x} overflows or underflows, and no
    # dependence on libdevice (the interpreter has none).
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _dropout_keep(seed, bh, row0, cols, drop_thresh, BLOCK_M: tl.constexpr, ROUNDS: tl.constexpr, K_AXIS: tl.constexpr):
    """The keep mask of attention dropout for query rows ``row0 + [0, BLOCK_M)`` x keys ``cols``.

    Element (query row ``i``, key ``j``) of sequence ``b``, query head ``h`` is decided by
    output word ``i % 4`` of one Philox-4x32 evaluation with counters ``(j, i // 4,
    b * H + h, 0)`` and the 64-bit ``seed`` as its key (positions counted inside the
    sequence): one evaluation serves four query rows, and a bit depends only on (seed,
    sequence, head, row, key), never on the tiles, so the forward, both backward kernels
    and :func:`dropout_keep_mask` regenerate the same mask. ``row0`` must be a multiple of
    4. Kept when the word, read as unsigned, is ``>= round(p * 2**32)``; compared as signed
    after flipping the sign bit, with ``drop_thresh = round(p * 2**32) - 2**31`` (int32).
    ``K_AXIS`` 0 returns ``(keys, rows)`` (the dK/dV kernel's tiles), 1 ``(rows, keys)``.
    """
    groups = row0 // 4 + tl.arange(0, BLOCK_M // 4)
    c0 = cols[:, None] + groups[None, :] * 0
    c1 = groups[None, :] + cols[:, None] * 0
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + bh, zero, ROUNDS)
    # Rows 4g, 4g+1, 4g+2, 4g+3 take words 0, 1, 2, 3 of group g: (keys, BLOCK_M).
    r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    keep = (r.to(tl.int32, bitcast=True) ^ -2147483648) >= drop_thresh
    if K_AXIS == 1:
        keep = tl.trans(keep)
    return keep


@triton.jit
def _sequence(ORDER, pid, IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The sequence that programs with ``program_id(2) == pid`` work on. Where lengths vary
    (varlen, padded with a mask) ``ORDER`` lists the sequences longest first (:func:`_seq_order`):
    the GPU starts programs in grid order, so the longest ones start first and the short ones
    fill the tail, instead of a long sequence drawn last running alone. Softcapped kernels
    keep the grid order: at BLOCK_D 128 they hold all 255 registers, and a loaded index (which,
    unlike ``program_id``, ptxas cannot rematerialise) spilled 5-16 more (sm_90: the masked
    softcapped forward at D = 80 0 -> 5 STL, at D = 128 7 -> 20; the atomic dK/dV at D = 80
    64 -> 70, its inner loop 4 -> 20)."""
    b = pid
    if (IS_VARLEN or HAS_MASK) and not HAS_SOFTCAP:
        b = tl.load(ORDER + pid)
    return b


@triton.jit
def _bounds(CU_Q, CU_K, RANGE, b, SEQ, IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr):
    """Per-sequence token bases and spans: (q0, k0, q_len, k_len, lo, hi_q, hi_k, holes).

    Rows ``[0, q_len)`` are written; queries in ``[lo, hi_q)`` and keys in ``[lo, hi_k)``
    can be valid (varlen: ``lo = 0``; padded: the span of the mask's True entries).
    ``holes`` says the mask has False entries inside that span, so it must be read per
    block; without holes (left / right padding) the span alone is exact and the inner
    loops run their mask-free version.
    """
    if IS_VARLEN:
        q0 = tl.load(CU_Q + b).to(tl.int64)
        q_len = (tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)).to(tl.int32)
        k0 = tl.load(CU_K + b).to(tl.int64)
        k_len = (tl.load(CU_K + b + 1) - tl.load(CU_K + b)).to(tl.int32)
        lo = q_len * 0
        hi_q = q_len
        hi_k = k_len
        holes = q_len < 0
    else:
        q0 = b.to(tl.int64) * 0
        k0 = q0
        q_len = SEQ + b * 0
        k_len = q_len
        if HAS_MASK:
            lo = tl.load(RANGE + 3 * b)
            hi_q = tl.load(RANGE + 3 * b + 1)
            holes = tl.load(RANGE + 3 * b + 2) != 0
        else:
            lo = b * 0
            hi_q = q_len
            holes = q_len < 0
        hi_k = hi_q
    return q0, k0, q_len, k_len, lo, hi_q, hi_k, holes


@triton.jit
def _fwd_block(
    acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kt, stride_vt, start_n, hi_k,
    offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, KD, VD, kb, krow, hk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DROPOUT: tl.constexpr, ROUNDS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TMA: tl.constexpr,
):
    cols = start_n + offs_n
    if BOUNDS:
        kvalid = cols < hi_k
    else:
        kvalid = cols >= 0
    if TMA:
        # One bulk copy per tile (rows past the tensor's end arrive as zeros, head-dim columns
        # past HEAD_DIM too). Rows past the span belong to the next sequence or the padding:
        # their scores are masked below, and V's are zeroed (0 * NaN would reach the output).
        kT = tl.trans(KD.load([kb, krow + start_n, hk, 0]).reshape(BLOCK_N, BLOCK_D))
        v = VD.load([kb, krow + start_n, hk, 0]).reshape(BLOCK_N, BLOCK_D)
        if BOUNDS:
            v = tl.where(kvalid[:, None], v, 0.0)
    elif BLOCK_D != HEAD_DIM:
        dmask = offs_d < HEAD_DIM
        kT = tl.load(k_base + offs_d[:, None] + cols[None, :] * stride_kt, mask=dmask[:, None] & kvalid[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kvalid[:, None] & dmask[None, :], other=0.0)
    elif BOUNDS:
        kT = tl.load(k_base + offs_d[:, None] + cols[None, :] * stride_kt, mask=kvalid[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kvalid[:, None], other=0.0)
    else:
        kT = tl.load(k_base + offs_d[:, None] + cols[None, :] * stride_kt)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
    if HAS_MASK:
        kvalid = kvalid & (tl.load(mask_base + cols, mask=kvalid, other=0) != 0)
    qk = tl.dot(q, kT, input_precision=DOT_PREC)
    # m_i starts finite (-1e30), so a row whose keys are all masked keeps alpha = 1, p = 0.
    if HAS_SOFTCAP:
        s = _tanh(qk * cap_in) * cap_out
        if BOUNDS or HAS_MASK:
            s = tl.where(kvalid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:
        if BOUNDS or HAS_MASK:
            qk = tl.where(kvalid[None, :], qk, float("-inf"))
        # The row max of the raw scores, scaled once per row: max(qk) * c == max(qk * c)
        # exactly for c > 0 (rounding is monotone), and the per-element scale folds into
        # the exponent's FFMA. Scaling every score before the max cost 32 FMUL per thread
        # and iteration of the 128 x 64 tile on 8 warps (~8% of the loop's SASS on sm_90).
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        # The normaliser l_i (and so the lse) sums the undropped probabilities; only the
        # product with V sees the mask. The 1 / (1 - p) rescale is applied once, at the end.
        p = tl.where(_dropout_keep(seed, bh, start_m, cols, drop_thresh, BLOCK_M, ROUNDS, 1), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_loop(
    acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kt, stride_vt, lo, hi_k,
    offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, KD, VD, kb, krow, hk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, USE_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DROPOUT: tl.constexpr, ROUNDS: tl.constexpr, BLOCK_M: tl.constexpr,
    TMA: tl.constexpr,
):
    # Full key blocks first without bounds checks, then one masked tail block.
    end_full = lo + ((hi_k - lo) // BLOCK_N) * BLOCK_N
    for start_n in range(lo, end_full, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kt, stride_vt, start_n, hi_k,
            offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, KD, VD, kb, krow, hk,
            HEAD_DIM, BLOCK_D, False, USE_MASK, HAS_SOFTCAP, DOT_PREC, DROPOUT, ROUNDS, BLOCK_M, BLOCK_N, TMA,
        )
    if end_full < hi_k:
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kt, stride_vt, end_full, hi_k,
            offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, KD, VD, kb, krow, hk,
            HEAD_DIM, BLOCK_D, True, USE_MASK, HAS_SOFTCAP, DOT_PREC, DROPOUT, ROUNDS, BLOCK_M, BLOCK_N, TMA,
        )
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, RANGE, MASK, SEED, ORDER, QD, KD, VD,
    sm_scale, softcap, drop_scale, SEQ, GROUP, drop_thresh, seqlen_bucket,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh, stride_mb,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
    DROPOUT: tl.constexpr, ROUNDS: tl.constexpr, MASK_HOLES: tl.constexpr, TMA: tl.constexpr = False,
):
    """Grid ``(cdiv(max_seqlen_q, BLOCK_M), H, B)``: one query block of one head.

    ``TMA`` (a tile option, ``triton.Config`` kwarg; sm_90, 16-bit): Q, K and V tiles come
    through the tensor-memory accelerator, from the host descriptors ``QD`` / ``KD`` / ``VD``
    (4-D: ``(B, S, H, D)`` padded, ``(1, T, H, D)`` packed; block ``(1, BLOCK_M or BLOCK_N,
    1, BLOCK_D)``, :func:`_tma_descs`) instead of per-thread pointer loads: no address or
    mask arithmetic in the loop and the registers of the pointer tiles freed. Without it
    they are None and unused.

    ``MASK_HOLES`` False (a mask known on the host to hold no holes, ``_tensor_cache.is_hole_free``):
    only the loop copy for spans is compiled; the copy for masks with holes reads the mask per
    column and, compiled beside it, made the 128 x 128 tile at D = 128 spill ~30 STL (sm_90).

    With ``DROPOUT``: ``O = (P * Z / (1 - p)) V`` for the keep mask ``Z`` of
    :func:`_dropout_keep` (``SEED`` one int64, ``drop_scale = 1 / (1 - p)``); the lse is
    that of the undropped softmax ``P``, which is what the backward needs.
    """
    # TMA tiles never run the loop copy for masks with holes (:func:`_tma_ok`): compiled
    # beside it, the 128 x 128 tile spilled 76 STL where the pointer tile spills 30 (sm_90).
    tl.static_assert(not (TMA and HAS_MASK and MASK_HOLES))
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = _sequence(ORDER, tl.program_id(2), IS_VARLEN, HAS_MASK, HAS_SOFTCAP)
    q0, k0, q_len, k_len, lo, hi_q, hi_k, holes = _bounds(CU_Q, CU_K, RANGE, b, SEQ, IS_VARLEN, HAS_MASK)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    rmask = offs_m < q_len
    q_base = Q + b.to(tl.int64) * stride_qb + q0 * stride_qt + h * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + k0 * stride_kt + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + k0 * stride_vt + hk * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + q0 * stride_ot + h * stride_oh
    l_base = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q0
    mask_base = MASK + b.to(tl.int64) * stride_mb

    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    bh = b * tl.num_programs(1) + h  # the RNG stream of (sequence, query head)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    # Query blocks wholly outside the valid span only write zeros (padded layout).
    # The descriptors' coordinates: batch index and row of the sequence's first token.
    if IS_VARLEN:
        kb = 0
        qrow = q0.to(tl.int32)
        krow = k0.to(tl.int32)
    else:
        kb = b
        qrow = 0
        krow = 0
    if (start_m + BLOCK_M > lo) & (start_m < hi_q):
        if TMA:
            # rows past q_len (the next sequence, padding) only feed rows never stored
            q = QD.load([kb, qrow + start_m, h, 0]).reshape(BLOCK_M, BLOCK_D)
        else:
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        qk_scale = sm_scale * 1.4426950408889634
        cap_in = sm_scale / softcap
        cap_out = softcap * 1.4426950408889634
        # Two copies of the loop only when a mask that may have holes exists (static branch on
        # HAS_MASK and MASK_HOLES): with holes the mask is read per block, without them the
        # span alone is exact.
        if HAS_MASK and MASK_HOLES:
            if holes:
                acc, l_i, m_i = _fwd_loop(
                    acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kt, stride_vt, lo, hi_k,
                    offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, KD, VD, kb, krow, hk,
                    HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_SOFTCAP, DOT_PREC, DROPOUT, ROUNDS, BLOCK_M, TMA,
                )
            else:
                acc, l_i, m_i = _fwd_loop(
                    acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kt, stride_vt, lo, hi_k,
                    offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, KD, VD, kb, krow, hk,
                    HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_SOFTCAP, DOT_PREC, DROPOUT, ROUNDS, BLOCK_M, TMA,
                )
        else:
            acc, l_i, m_i = _fwd_loop(
                acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kt, stride_vt, lo, hi_k,
                offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, KD, VD, kb, krow, hk,
                HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_SOFTCAP, DOT_PREC, DROPOUT, ROUNDS, BLOCK_M, TMA,
            )
    qvalid = (l_i > 0.0) & (offs_m >= lo) & (offs_m < hi_q)
    if HAS_MASK:
        qvalid = qvalid & (tl.load(mask_base + offs_m, mask=rmask, other=0) != 0)
    l_safe = tl.where(qvalid, l_i, 1.0)
    if DROPOUT:
        out = tl.where(qvalid[:, None], acc * (drop_scale / l_safe)[:, None], 0.0)
    else:
        out = tl.where(qvalid[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(qvalid, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(l_base + offs_m, lse, mask=rmask)


@triton.jit
def _bwd_scores(qk, lse2, kvalid, qk_scale, cap_in, cap_out, HAS_SOFTCAP: tl.constexpr, KMASK: tl.constexpr,
                K_AXIS: tl.constexpr, CLAMP: tl.constexpr = False):
    """Probabilities and the softcap derivative factor from raw scores ``qk`` (fp32).

    ``lse2`` is the base-2 lse with ``+inf`` for rows that have no valid key, ``K_AXIS``
    says which axis of ``qk`` runs over keys (1: ``(M, N)``, the dQ kernel; 0: ``(N, M)``,
    the dK/dV kernel). Invalid keys get exactly 0 from a select, never a product, so
    whatever their scores hold (NaN included) never gets through.

    ``CLAMP`` (the TMA tiles, whose rows or keys past a span arrive as zero vectors): the
    exponent is capped at 0, so P <= 1. A valid score is at most its row's lse (up to
    rounding), so valid probabilities keep their value; a zero vector's score 0 against
    another row's lse below -128 (very negative logits) would otherwise give inf, which the
    zero rows it meets turn into NaN. One min per score, where a row or key select cost the
    dK/dV loop ~100 instructions (sm_90).
    """
    if HAS_SOFTCAP:
        t = _tanh(qk * cap_in)
        s = t * cap_out
        dcap = 1.0 - t * t
    else:
        s = qk * qk_scale
        dcap = s
    if K_AXIS == 1:
        if KMASK:
            s = tl.where(kvalid[None, :], s, float("-inf"))
        if CLAMP:
            p = tl.exp2(tl.minimum(s - lse2[:, None], 0.0))
        else:
            p = tl.exp2(s - lse2[:, None])
    elif HAS_SOFTCAP:
        if KMASK:
            s = tl.where(kvalid[:, None], s, float("-inf"))
        if CLAMP:
            p = tl.exp2(tl.minimum(s - lse2[None, :], 0.0))
        else:
            p = tl.exp2(s - lse2[None, :])
    elif CLAMP:
        p = tl.exp2(tl.minimum(tl.fma(qk, qk_scale, -lse2[None, :]), 0.0))
        if KMASK:
            p = tl.where(kvalid[:, None], p, 0.0)
    else:
        # The dK/dV kernel's inner loop without softcap: one FFMA per score instead of a
        # product and a difference, and the key mask selected after exp2 (sm_90, D = 128,
        # 64 x 64 on 4 warps: 769 -> 737 instructions per query block with Triton 3.6, 646
        # -> 625 with 3.9). Elsewhere it did not pay: the dQ kernel's loop kept its count
        # with 3.6 and grew with 3.9 (masked, 330 -> 340), its fp32 tiles and the softcapped
        # dK/dV tiles spilled more (D = 256 fp32 dQ with dropout 512 -> 572 STL, D = 80 dK/dV
        # 55 -> 58).
        p = tl.exp2(tl.fma(qk, qk_scale, -lse2[None, :]))
        if KMASK:
            p = tl.where(kvalid[:, None], p, 0.0)
    return p, dcap


@triton.jit
def _lse2(lse):
    # -inf marks a row without keys: +inf makes every probability of that row exactly 0.
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _load_lse2(l_ptrs, rmask):
    return _lse2(tl.load(l_ptrs, mask=rmask, other=float("-inf")))


@triton.jit
def _dq_block(
    dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_kt, stride_vt, start_n, hi_k,
    offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DROPOUT: tl.constexpr, ROUNDS: tl.constexpr, BLOCK_M: tl.constexpr,
    KD=None, VD=None, lo=0, hk=0, BLOCK_N: tl.constexpr = 16, TMA: tl.constexpr = False,
):
    cols = start_n + offs_n
    if BOUNDS:
        kvalid = cols < hi_k
    else:
        kvalid = cols >= 0
    if TMA:
        # descriptors bounded to the key span: keys past it arrive as zeros (below)
        kT = tl.trans(KD.load([start_n - lo, hk, 0]).reshape(BLOCK_N, BLOCK_D))
        vT = tl.trans(VD.load([start_n - lo, hk, 0]).reshape(BLOCK_N, BLOCK_D))
    elif BLOCK_D != HEAD_DIM or BOUNDS:
        kvm = (offs_d < HEAD_DIM)[:, None] & kvalid[None, :]
        kT = tl.load(k_base + offs_d[:, None] + cols[None, :] * stride_kt, mask=kvm, other=0.0)
        vT = tl.load(v_base + offs_d[:, None] + cols[None, :] * stride_vt, mask=kvm, other=0.0)
    else:
        kT = tl.load(k_base + offs_d[:, None] + cols[None, :] * stride_kt)
        vT = tl.load(v_base + offs_d[:, None] + cols[None, :] * stride_vt)
    if HAS_MASK:
        kvalid = kvalid & (tl.load(mask_base + cols, mask=kvalid, other=0) != 0)
    qk = tl.dot(q, kT, input_precision=DOT_PREC)
    p, dcap = _bwd_scores(qk, lse2, kvalid, qk_scale, cap_in, cap_out, HAS_SOFTCAP, BOUNDS or HAS_MASK, 1, TMA)
    dp = tl.dot(do, vT, input_precision=DOT_PREC)
    if DROPOUT:
        # dO V^T is the gradient of the dropped probabilities P * Z / (1 - p); the chain
        # rule through the mask gives dP = Z * (dO V^T) / (1 - p). delta = rowsum(dO * O)
        # is still rowsum(P * dP), because O already is the dropped output.
        dp = tl.where(_dropout_keep(seed, bh, start_m, cols, drop_thresh, BLOCK_M, ROUNDS, 1), dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * dcap
    return dq + tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PREC)


@triton.jit
def _dq_loop_tma(
    dq, q, do, lse2, delta, KD, VD, lo, hi_k, hk, offs_n, offs_d, qk_scale, cap_in, cap_out, start_m,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr, ROUNDS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The TMA tiles' loop: K and V from descriptors bounded to the key span, one unmasked copy
    for every key block. Keys past the span come as zero K and V rows: their P (capped at 1,
    _bwd_scores' CLAMP: exp2 of a very negative lse would be inf) meets zero dP and a zero K
    row in dS K, so they add exact zeros."""
    for start_n in range(lo, hi_k, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, KD, VD, KD, 0, 0, start_n, hi_k,
            offs_n, offs_d, qk_scale, cap_in, cap_out, 0, 0, start_m, 0, 1.0,
            HEAD_DIM, BLOCK_D, False, False, HAS_SOFTCAP, DOT_PREC, False, ROUNDS, BLOCK_M,
            KD, VD, lo, hk, BLOCK_N, True,
        )
    return dq


@triton.jit
def _dq_loop(
    dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_kt, stride_vt, lo, hi_k,
    offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, USE_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DROPOUT: tl.constexpr, ROUNDS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    end_full = lo + ((hi_k - lo) // BLOCK_N) * BLOCK_N
    for start_n in range(lo, end_full, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_kt, stride_vt, start_n, hi_k,
            offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, drop_scale,
            HEAD_DIM, BLOCK_D, False, USE_MASK, HAS_SOFTCAP, DOT_PREC, DROPOUT, ROUNDS, BLOCK_M,
        )
    if end_full < hi_k:
        dq = _dq_block(
            dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_kt, stride_vt, end_full, hi_k,
            offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, drop_scale,
            HEAD_DIM, BLOCK_D, True, USE_MASK, HAS_SOFTCAP, DOT_PREC, DROPOUT, ROUNDS, BLOCK_M,
        )
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, LSE2, DELTA, CU_Q, CU_K, RANGE, MASK, SEED, ORDER,
    sm_scale, softcap, drop_scale, SEQ, GROUP, drop_thresh, seqlen_bucket,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh, stride_mb,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
    DROPOUT: tl.constexpr, ROUNDS: tl.constexpr, DELTA_ONLY: tl.constexpr = False,
    MASK_HOLES: tl.constexpr = True, TMA: tl.constexpr = False,
):
    """Grid ``(cdiv(max_seqlen_q, BLOCK_M), H, B)``: dQ of one query block; writes delta and
    ``LSE2`` (the base-2 lse the dK/dV kernel reads, ``+inf`` for rows without keys) too.

    ``dS = P * (dP - delta)`` with ``dP = dO V^T`` (with ``DROPOUT``: ``dP = Z * (dO V^T) /
    (1 - p)``, the forward's mask regenerated); ``dQ = scale * (dS * softcap') K``.
    ``DELTA_ONLY``: only ``delta = rowsum(dO * O)`` and ``LSE2`` (the atomic backward's first pass).
    ``MASK_HOLES`` False (a mask known hole-free, as for the forward): only the key loop
    without per-block mask reads is compiled.
    ``TMA`` (a tile option; sm_90, 16-bit, no dropout, no mask that may have holes): K and V
    tiles through descriptors the kernel makes for its sequence's span of keys, one unmasked
    loop copy (keys past the span arrive as zeros and add exact zeros).
    """
    tl.static_assert(not (TMA and (DROPOUT or (HAS_MASK and MASK_HOLES))))
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = _sequence(ORDER, tl.program_id(2), IS_VARLEN, HAS_MASK, HAS_SOFTCAP)
    q0, k0, q_len, k_len, lo, hi_q, hi_k, holes = _bounds(CU_Q, CU_K, RANGE, b, SEQ, IS_VARLEN, HAS_MASK)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    rmask = offs_m < q_len
    md = rmask[:, None] & dmask[None, :]
    bb = b.to(tl.int64)
    q_base = Q + bb * stride_qb + q0 * stride_qt + h * stride_qh
    k_base = K + bb * stride_kb + k0 * stride_kt + hk * stride_kh
    v_base = V + bb * stride_vb + k0 * stride_vt + hk * stride_vh
    o_base = O + bb * stride_ob + q0 * stride_ot + h * stride_oh
    do_base = DO + bb * stride_dob + q0 * stride_dot + h * stride_doh
    dq_base = DQ + bb * stride_dqb + q0 * stride_dqt + h * stride_dqh
    l_off = bb * stride_lb + h.to(tl.int64) * stride_lh + q0
    mask_base = MASK + bb * stride_mb

    # The dK/dV kernel reads every row's lse once per key block: converted here once (base 2,
    # +inf for a row without keys) rather than there per load (16 compares, products and
    # selects per thread and query block on its 64 x 64 tile at D = 128; with the FFMA form
    # of _bwd_scores its inner loop went from 769 to 702 SASS instructions with Triton 3.6
    # and from 646 to 570 with 3.9, sm_90; its spill loads stay 5 / 0, as before).
    lse2_rows = _load_lse2(LSE + l_off + offs_m, rmask)
    tl.store(LSE2 + l_off + offs_m, lse2_rows, mask=rmask)
    if HAS_MASK:
        # Padded rows (lse2 = +inf) load q and dO as zeros, so their dQ is exactly 0 whatever
        # the padding holds (a NaN there would reach the weights' gradients through the
        # projections). A select on dQ after the loop instead spilled more in the fp32 tiles.
        ld = md & (lse2_rows < float("inf"))[:, None]
    else:
        ld = md
    o = tl.load(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], mask=ld, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=ld, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + l_off + offs_m, delta, mask=rmask)
    if DELTA_ONLY:
        return
    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    bh = b * tl.num_programs(1) + h
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if (start_m + BLOCK_M > lo) & (start_m < hi_q):
        lse2 = _load_lse2(LSE + l_off + offs_m, rmask)
        if HAS_MASK:  # padded rows as zeros, from this lse2 (holding `ld` until here spilled more, fp32)
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=md & (lse2 < float("inf"))[:, None],
                        other=0.0)
        else:
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=md, other=0.0)
        qk_scale = sm_scale * 1.4426950408889634
        cap_in = sm_scale / softcap
        cap_out = softcap * 1.4426950408889634
        if TMA:
            span_k = tl.maximum(hi_k - lo, 1)
            nhk = tl.num_programs(1) // GROUP
            kd = tl.make_tensor_descriptor(K + bb * stride_kb + (k0 + lo) * stride_kt, shape=[span_k, nhk, HEAD_DIM],
                                           strides=[stride_kt, stride_kh, 1], block_shape=[BLOCK_N, 1, BLOCK_D])
            vd = tl.make_tensor_descriptor(V + bb * stride_vb + (k0 + lo) * stride_vt, shape=[span_k, nhk, HEAD_DIM],
                                           strides=[stride_vt, stride_vh, 1], block_shape=[BLOCK_N, 1, BLOCK_D])
            dq = _dq_loop_tma(
                dq, q, do, lse2, delta, kd, vd, lo, hi_k, hk, offs_n, offs_d, qk_scale, cap_in, cap_out, start_m,
                HEAD_DIM, BLOCK_D, BLOCK_N, HAS_SOFTCAP, DOT_PREC, ROUNDS, BLOCK_M,
            )
        elif HAS_MASK and MASK_HOLES:
            if holes:
                dq = _dq_loop(
                    dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_kt, stride_vt, lo, hi_k,
                    offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, drop_scale,
                    HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_SOFTCAP, DOT_PREC, DROPOUT, ROUNDS, BLOCK_M,
                )
            else:
                dq = _dq_loop(
                    dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_kt, stride_vt, lo, hi_k,
                    offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, drop_scale,
                    HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_SOFTCAP, DOT_PREC, DROPOUT, ROUNDS, BLOCK_M,
                )
        else:
            dq = _dq_loop(
                dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_kt, stride_vt, lo, hi_k,
                offs_n, offs_d, qk_scale, cap_in, cap_out, seed, bh, start_m, drop_thresh, drop_scale,
                HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_SOFTCAP, DOT_PREC, DROPOUT, ROUNDS, BLOCK_M,
            )
    dq = dq * sm_scale
    tl.store(dq_base + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, kvalid, q_base, do_base, lse2_base, delta_base, dq_base, start_m, lo, hi_q, stride_qt,
    stride_dot, stride_dqt, offs_m, offs_d, qk_scale, cap_in, cap_out, seed, bh, offs_n, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, KMASK: tl.constexpr,
    ROWMASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DROPOUT: tl.constexpr,
    ROUNDS: tl.constexpr, ATOMIC_DQ: tl.constexpr, QD=None, DOD=None, h=0, TMA: tl.constexpr = False,
):
    """One query block's share of dK and dV. ``ROWMASK`` False: every row of the block lies in
    ``[lo, hi_q)``, so q, dO, lse and delta load without a row mask (the loop's full blocks);
    True (1): rows from ``hi_q`` on load as zeros; 2: also rows below ``lo`` (a block started
    below it) read row ``lo``'s q and dO, with lse ``+inf`` and delta 0, so they add exact
    zeros whatever the padding holds."""
    rows = start_m + offs_m
    if ROWMASK == 2:
        src = tl.maximum(rows, lo)
    else:
        src = rows
    dmask = offs_d < HEAD_DIM
    if TMA:
        # Descriptors bounded to the span [lo, hi_q): rows past it (and head-dim columns past
        # HEAD_DIM) arrive as zeros, so they add exact zeros to dK and dV without a row mask.
        qT = tl.trans(QD.load([start_m - lo, h, 0]).reshape(BLOCK_M, BLOCK_D))
        do = DOD.load([start_m - lo, h, 0]).reshape(BLOCK_M, BLOCK_D)
        # Loaded unmasked: past hi_q they read padded rows, the next sequence's or head's rows,
        # or the buffers' tail (attention_backward), all finite or +inf; against the zero q
        # and dO rows they add exact zeros, P capped at 1 (_bwd_scores' CLAMP: exp2 of
        # another row's very negative lse would be inf, and inf * 0 NaN). Masking them cost
        # the loop ~140 instructions, a select on lse2 ~100 (sm_90).
        lse2 = tl.load(lse2_base + rows)
        delta = tl.load(delta_base + rows)
    else:
        q_ptrs = q_base + offs_d[:, None] + src[None, :] * stride_qt
        do_ptrs = do_base + src[:, None] * stride_dot + offs_d[None, :]
        if ROWMASK:
            if DROPOUT:
                rmask = (rows >= lo) & (rows < hi_q)
            else:
                rmask = rows < hi_q
            # Rows outside load as zeros with lse = +inf: their probabilities are exactly 0.
            qT = tl.load(q_ptrs, mask=dmask[:, None] & rmask[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)
            lse2 = tl.load(lse2_base + rows, mask=rmask, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=rmask, other=0.0)
            if ROWMASK == 2:
                lse2 = tl.where(rows >= lo, lse2, float("inf"))
                delta = tl.where(rows >= lo, delta, 0.0)
        else:
            if BLOCK_D != HEAD_DIM:
                qT = tl.load(q_ptrs, mask=dmask[:, None], other=0.0)
                do = tl.load(do_ptrs, mask=dmask[None, :], other=0.0)
            else:
                qT = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            lse2 = tl.load(lse2_base + rows)
            delta = tl.load(delta_base + rows)
    qkT = tl.dot(k, qT, input_precision=DOT_PREC)
    if (not DROPOUT) and (not ATOMIC_DQ):
        # S^T and dP^T first, back to back, then P, dV: nothing of the scores' math is held
        # across a matmul (sm_90, 64 x 128 on 8 warps at D = 128: the inner loop's spill
        # stores / loads 2 / 12 -> 0 / 0, 33 / 60 -> 0 / 24 with mask and softcap). The
        # atomic kernel's extra dQ matmul spills more in this order, so it keeps the other.
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        pT, dcap = _bwd_scores(qkT, lse2, kvalid, qk_scale, cap_in, cap_out, HAS_SOFTCAP, KMASK, 0, TMA)
        if (BLOCK_D >= 128) and (BLOCK_M >= 64) and (DOT_PREC != "ieee"):
            # The big tiles also form dS before either update matmul: P, dP and the
            # softcap factor die in one elementwise pass instead of living across the dV
            # matmul (sm_90, 64 x 128 on 8 warps at D = 128, softcap without mask: 74 -> 36
            # STL, the inner loop's 34 / 49 spill stores / loads -> 0 / 9; the one-stage
            # tile with mask and softcap 25 -> 18). 32-row tiles and BLOCK_D <= 64 spilled more so.
            dsT = pT * (dpT - delta[None, :])
            if HAS_SOFTCAP:
                dsT = dsT * dcap
            dsT = dsT.to(qT.dtype)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
            dk += tl.dot(dsT, tl.trans(qT), input_precision=DOT_PREC)
            return dk, dv
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    elif DROPOUT:
        # The forward's mask, transposed: dV = (P * Z)^T dO / (1 - p) (the rescale is
        # applied once, after the loops) and dP = Z * (dO V^T) / (1 - p).
        pT, dcap = _bwd_scores(qkT, lse2, kvalid, qk_scale, cap_in, cap_out, HAS_SOFTCAP, KMASK, 0, TMA)
        keepT = _dropout_keep(seed, bh, start_m, offs_n, drop_thresh, BLOCK_M, ROUNDS, 0)
        dv += tl.dot(tl.where(keepT, pT, 0.0).to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dpT = tl.where(keepT, dpT * drop_scale, 0.0)
    else:
        pT, dcap = _bwd_scores(qkT, lse2, kvalid, qk_scale, cap_in, cap_out, HAS_SOFTCAP, KMASK, 0, TMA)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    if HAS_SOFTCAP:
        dsT = dsT * dcap
    dsT = dsT.to(qT.dtype)
    dk += tl.dot(dsT, tl.trans(qT), input_precision=DOT_PREC)
    if ATOMIC_DQ:
        # This key block's share of dQ, scaled (qk_scale * ln 2 = softmax_scale) and added to
        # the other key blocks' shares in the fp32 accumulator.
        dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PREC) * (qk_scale * 0.6931471805599453)
        dq_ptrs = dq_base + rows[:, None] * stride_dqt + offs_d[None, :]
        if ROWMASK:
            tl.atomic_add(dq_ptrs, dq, mask=(rows < hi_q)[:, None] & dmask[None, :], sem="relaxed")
        elif BLOCK_D != HEAD_DIM:
            tl.atomic_add(dq_ptrs, dq, mask=dmask[None, :], sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_loop_tma(
    dk, dv, k, v, kvalid, QD, DOD, LSE2, DELTA, bb, q0, hk, GROUP, lo, hi_q, stride_lb, stride_lh,
    offs_m, offs_d, qk_scale, cap_in, cap_out, offs_n,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr, ROUNDS: tl.constexpr,
):
    """The TMA tiles' loops: q and dO from descriptors bounded to the span, so every query
    block runs the one copy without row or key masks, from lo (an unaligned start costs a
    TMA copy nothing)."""
    for g in range(0, GROUP):
        h = hk * GROUP + g
        l_off = bb * stride_lb + h.to(tl.int64) * stride_lh + q0
        for start_m in range(lo, hi_q, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, kvalid, QD, DOD, LSE2 + l_off, DELTA + l_off, DELTA, start_m, lo, hi_q,
                0, 0, 0, offs_m, offs_d, qk_scale, cap_in, cap_out, 0, 0,
                offs_n, 0, 1.0, HEAD_DIM, BLOCK_D, BLOCK_M, False, 0, HAS_SOFTCAP,
                DOT_PREC, False, ROUNDS, False, QD, DOD, h, True,
            )
    return dk, dv


@triton.jit
def _dkdv_loop(
    dk, dv, k, v, kvalid, Q, DO, LSE2, DELTA, DQ, bb, q0, hk, GROUP, lo, hi_q,
    stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh, offs_m, offs_d, qk_scale, cap_in, cap_out, seed, bh0, offs_n, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, KMASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DROPOUT: tl.constexpr, ROUNDS: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_M: tl.constexpr, SPLIT_M: tl.constexpr,
):
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + bb * stride_qb + q0 * stride_qt + h * stride_qh
        do_base = DO + bb * stride_dob + q0 * stride_dot + h * stride_doh
        dq_base = DQ + bb * stride_dqb + q0 * stride_dqt + h * stride_dqh
        l_off = bb * stride_lb + h.to(tl.int64) * stride_lh + q0
        if DROPOUT or BLOCK_D != 64 or DOT_PREC == "ieee" or ATOMIC_DQ:
            # One masked loop. With dropout: _dropout_keep serves four query rows per Philox
            # call from a multiple of 4, so the query blocks start there and rows below lo
            # (padding) are masked like those past hi_q, in every block. At every BLOCK_D
            # but 64 and for fp32 the split below adds registers enough to spill (32 x 64 on
            # 8 warps at D = 128: 212 -> 255 registers and 25 STL on sm_90; 64 x 64 on 4 warps
            # at D = 32: 2 STL on sm_80).
            #
            # Padded layout (HAS_MASK): blocks start at lo rounded down to BLOCK_M, as in the
            # dense and packed layouts (where lo is 0), and rows below lo (left padding) read
            # row lo's q and dO with lse = +inf and delta = 0 (ROWMASK 2): exact zeros, even
            # where the padding holds inf / NaN. Starting at lo itself made the row loads'
            # addresses unaligned (sm_90, 64 x 128 on 8 warps at D = 128, masked: 50 -> 32
            # STL, the inner loop's 14 spill reloads -> 0; with softcap 58 -> 37, 22 -> 1).
            # 64-row 16-bit tiles only: the atomic kernel (23 -> 27 STL), 32- / 16-row and fp32
            # tiles (1-6 STL from none) spilled more this way, and keep the start at lo.
            row_mode = 2 if HAS_MASK and not (DROPOUT or ATOMIC_DQ) and BLOCK_M >= 64 and DOT_PREC != "ieee" else 1
            if EVEN_M:
                # Dense layout, every query block full (S a multiple of BLOCK_M): no row masks
                # at all. Their predicates and selects were a third of the loop (sm_90, D =
                # 128, 64 x 64 on 4 warps: 702 -> 478 SASS instructions with Triton 3.6, 570
                # -> 445 with 3.9), while one loop keeps the registers of one copy.
                row_mode = 0
            # A tile option for the packed and padded layouts (the autotuner weighs it):
            # the interior query blocks without row masks, a masked first block where it
            # starts below lo and a masked tail. Two more copies of the block: on 64 x 128
            # with 8 warps and one stage the loop stays spill-free with Triton 3.6 and
            # shrinks from 484 to 420 SASS instructions packed, 533 to 459 masked (sm_90,
            # D = 128); smaller tiles spilled in it, and so did softcap (5-12 spill stores
            # in the loop), which keeps the one masked loop.
            split = SPLIT_M and row_mode != 0 and not (DROPOUT or ATOMIC_DQ or HAS_SOFTCAP) and DOT_PREC != "ieee"
        else:
            # Full query blocks first without row masks, then one masked tail block, as the
            # forward does for keys: the inner loop's sm_90 SASS at D = 64 (32 x 64, 4 warps)
            # drops from 313 to 260 instructions (280 -> 228 without the key mask).
            row_mode = 1
            split = True
        if DROPOUT:
            m_lo = lo - lo % 4
        elif row_mode == 2:
            m_lo = (lo // BLOCK_M) * BLOCK_M
        else:
            m_lo = lo
        if split:
            start = m_lo
            if row_mode == 2 and start < lo:  # a masked first block where the span starts inside it
                dk, dv = _dkdv_block(
                    dk, dv, k, v, kvalid, q_base, do_base, LSE2 + l_off, DELTA + l_off, dq_base, start, lo, hi_q,
                    stride_qt, stride_dot, stride_dqt, offs_m, offs_d, qk_scale, cap_in, cap_out, seed, bh0 + g,
                    offs_n, drop_thresh, drop_scale, HEAD_DIM, BLOCK_D, BLOCK_M, KMASK, row_mode, HAS_SOFTCAP,
                    DOT_PREC, DROPOUT, ROUNDS, ATOMIC_DQ,
                )
                start += BLOCK_M
            end_full = start + (tl.maximum(hi_q - start, 0) // BLOCK_M) * BLOCK_M
            for start_m in range(start, end_full, BLOCK_M):
                dk, dv = _dkdv_block(
                    dk, dv, k, v, kvalid, q_base, do_base, LSE2 + l_off, DELTA + l_off, dq_base, start_m, lo, hi_q,
                    stride_qt, stride_dot, stride_dqt, offs_m, offs_d, qk_scale, cap_in, cap_out, seed, bh0 + g,
                    offs_n, drop_thresh, drop_scale, HEAD_DIM, BLOCK_D, BLOCK_M, KMASK, 0, HAS_SOFTCAP,
                    DOT_PREC, DROPOUT, ROUNDS, ATOMIC_DQ,
                )
            if end_full < hi_q:
                dk, dv = _dkdv_block(
                    dk, dv, k, v, kvalid, q_base, do_base, LSE2 + l_off, DELTA + l_off, dq_base, end_full, lo, hi_q,
                    stride_qt, stride_dot, stride_dqt, offs_m, offs_d, qk_scale, cap_in, cap_out, seed, bh0 + g,
                    offs_n, drop_thresh, drop_scale, HEAD_DIM, BLOCK_D, BLOCK_M, KMASK, 1, HAS_SOFTCAP,
                    DOT_PREC, DROPOUT, ROUNDS, ATOMIC_DQ,
                )
        else:
            for start_m in range(m_lo, hi_q, BLOCK_M):
                dk, dv = _dkdv_block(
                    dk, dv, k, v, kvalid, q_base, do_base, LSE2 + l_off, DELTA + l_off, dq_base, start_m, lo, hi_q,
                    stride_qt, stride_dot, stride_dqt, offs_m, offs_d, qk_scale, cap_in, cap_out, seed, bh0 + g,
                    offs_n, drop_thresh, drop_scale, HEAD_DIM, BLOCK_D, BLOCK_M, KMASK, row_mode, HAS_SOFTCAP,
                    DOT_PREC, DROPOUT, ROUNDS, ATOMIC_DQ,
                )
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, DQ, LSE2, DELTA, CU_Q, CU_K, RANGE, MASK, SEED, ORDER,
    sm_scale, softcap, drop_scale, SEQ, GROUP, drop_thresh, seqlen_bucket,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh, stride_mb,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
    DROPOUT: tl.constexpr, ROUNDS: tl.constexpr, ATOMIC_DQ: tl.constexpr = False, EVEN_M: tl.constexpr = False,
    SPLIT_M: tl.constexpr = False, TMA: tl.constexpr = False,
):
    """Grid ``(cdiv(max_seqlen_k, BLOCK_N), Hkv, B)``: dK, dV of one key block of one K/V head.

    Loops over every query block of the ``G`` query heads that share the K/V head, so the
    GQA sum happens in registers: ``dV = P^T dO``, ``dK = scale * (dS * softcap')^T Q``
    (with ``DROPOUT``: ``dV = (P * Z)^T dO / (1 - p)``, ``dS`` as in the dQ kernel).
    ``LSE2``: the dQ kernel's base-2 lse (``+inf`` for rows without keys), not the forward's.
    ``EVEN_M``: 16-bit inputs in the dense layout (no mask, not packed) with ``S`` a multiple
    of :data:`EVEN_M_ROWS`, which every listed ``BLOCK_M`` divides: query blocks load
    unmasked (fp32's FMA-dot tiles gain nothing from it and spilled a few registers).
    ``SPLIT_M`` (a tile option, ``triton.Config`` kwarg): elsewhere, full query blocks unmasked
    and only the first / last masked, in the one-loop path of 16-bit tiles without dropout
    or softcap.
    ``TMA`` (a tile option; sm_90, 16-bit, without dropout and the atomic dQ): q and dO tiles
    through tensor descriptors the kernel makes for its sequence's span of rows (global
    scratch from Triton's allocator, :func:`_ensure_allocator`): rows past the span arrive
    as zeros, so every query block runs unmasked, and invalid keys are zeroed once after the
    loops instead of per score.
    """
    tl.static_assert(not (TMA and (DROPOUT or ATOMIC_DQ)))
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = _sequence(ORDER, tl.program_id(2), IS_VARLEN, HAS_MASK, HAS_SOFTCAP)
    q0, k0, q_len, k_len, lo, hi_q, hi_k, holes = _bounds(CU_Q, CU_K, RANGE, b, SEQ, IS_VARLEN, HAS_MASK)
    start_n = pid_n * BLOCK_N
    if start_n >= k_len:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    nmask = offs_n < k_len
    nd = nmask[:, None] & dmask[None, :]
    bb = b.to(tl.int64)
    k_base = K + bb * stride_kb + k0 * stride_kt + hk * stride_kh
    v_base = V + bb * stride_vb + k0 * stride_vt + hk * stride_vh
    dk_base = DK + bb * stride_dkb + k0 * stride_dkt + hk * stride_dkh
    dv_base = DV + bb * stride_dvb + k0 * stride_dvt + hk * stride_dvh
    mask_base = MASK + bb * stride_mb

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if (start_n + BLOCK_N > lo) & (start_n < hi_k):
        kvalid = (offs_n >= lo) & (offs_n < hi_k)
        if HAS_MASK:
            kvalid = kvalid & (tl.load(mask_base + offs_n, mask=nmask, other=0) != 0)
        # Keys outside the span load as zeros where it matters. The atomic backward: their
        # dS is 0 only if their V is finite, and dQ sums dS^T K over them (0 * NaN would
        # reach valid queries' dQ). The padded layout: a zero V makes their dP, dS and so
        # their own dK, dV 0 whatever the padding holds; their K only reaches scores the key
        # mask drops, except through softcap's derivative (tanh' of a NaN score), so with
        # softcap it loads as zeros too. Zeros for K without softcap put a spill reload into
        # the masked D = 128 loop (sm_90).
        span = ((offs_n >= lo) & (offs_n < hi_k))[:, None] & dmask[None, :]
        if ATOMIC_DQ or (HAS_MASK and HAS_SOFTCAP):
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=span, other=0.0)
        else:
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=nd, other=0.0)
        if ATOMIC_DQ or HAS_MASK:
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=span, other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=nd, other=0.0)
        qk_scale = sm_scale * 1.4426950408889634
        cap_in = sm_scale / softcap
        cap_out = softcap * 1.4426950408889634
        if DROPOUT:
            seed = tl.load(SEED)
        else:
            seed = 0
        bh0 = (b * tl.num_programs(1) + hk) * GROUP  # query head hk * G + g of sequence b: bh0 + g
        # Interior key blocks of a hole-free span need no key mask in the inner loop; at
        # BLOCK_D 64 they get an unmasked copy of it. Elsewhere every block takes the masked
        # loop (a select per score): the second copy's live ranges cost registers the big
        # tiles lack (sm_90, 64 x 128 on 8 warps at D = 128: 82 -> 39 STL without mask and
        # softcap, 142 -> 96 with both; the atomic 64 x 128 one-stage tile 150 -> 64).
        if TMA:
            # Query tiles through descriptors made here for this sequence's span of rows (all
            # heads: one per tensor and program), so rows past the span need no mask: no key
            # mask in the loop either, since a key only reaches its own dK / dV rows, which
            # are zeroed below where the key is not valid (whatever its scores held).
            nh = GROUP * tl.num_programs(1)
            span_q = tl.maximum(hi_q - lo, 1)
            qd = tl.make_tensor_descriptor(Q + bb * stride_qb + (q0 + lo) * stride_qt, shape=[span_q, nh, HEAD_DIM],
                                           strides=[stride_qt, stride_qh, 1], block_shape=[BLOCK_M, 1, BLOCK_D])
            dod = tl.make_tensor_descriptor(DO + bb * stride_dob + (q0 + lo) * stride_dot, shape=[span_q, nh, HEAD_DIM],
                                            strides=[stride_dot, stride_doh, 1], block_shape=[BLOCK_M, 1, BLOCK_D])
            dk, dv = _dkdv_loop_tma(
                dk, dv, k, v, kvalid, qd, dod, LSE2, DELTA, bb, q0, hk, GROUP, lo, hi_q, stride_lb, stride_lh,
                offs_m, offs_d, qk_scale, cap_in, cap_out, offs_n, HEAD_DIM, BLOCK_D, BLOCK_M, HAS_SOFTCAP, DOT_PREC,
                ROUNDS,
            )
            dk = tl.where(kvalid[:, None], dk, 0.0)
            dv = tl.where(kvalid[:, None], dv, 0.0)
        elif (BLOCK_D != 64) and (BLOCK_M >= 64) and (DOT_PREC != "ieee"):
            dk, dv = _dkdv_loop(
                dk, dv, k, v, kvalid, Q, DO, LSE2, DELTA, DQ, bb, q0, hk, GROUP, lo, hi_q,
                stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
                stride_lb, stride_lh, offs_m, offs_d, qk_scale, cap_in, cap_out, seed, bh0, offs_n, drop_thresh,
                drop_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, HAS_SOFTCAP, DOT_PREC, DROPOUT, ROUNDS, ATOMIC_DQ, HAS_MASK,
                EVEN_M, SPLIT_M,
            )
        elif holes | (start_n < lo) | (start_n + BLOCK_N > hi_k):
            dk, dv = _dkdv_loop(
                dk, dv, k, v, kvalid, Q, DO, LSE2, DELTA, DQ, bb, q0, hk, GROUP, lo, hi_q,
                stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
                stride_lb, stride_lh, offs_m, offs_d, qk_scale, cap_in, cap_out, seed, bh0, offs_n, drop_thresh,
                drop_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, HAS_SOFTCAP, DOT_PREC, DROPOUT, ROUNDS, ATOMIC_DQ, HAS_MASK,
                EVEN_M, SPLIT_M,
            )
        else:
            dk, dv = _dkdv_loop(
                dk, dv, k, v, kvalid, Q, DO, LSE2, DELTA, DQ, bb, q0, hk, GROUP, lo, hi_q,
                stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
                stride_lb, stride_lh, offs_m, offs_d, qk_scale, cap_in, cap_out, seed, bh0, offs_n, drop_thresh,
                drop_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False, HAS_SOFTCAP, DOT_PREC, DROPOUT, ROUNDS, ATOMIC_DQ, HAS_MASK,
                EVEN_M, SPLIT_M,
            )
    if DROPOUT:
        dv = dv * drop_scale
    dk = dk * sm_scale
    tl.store(dk_base + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=nd)
    tl.store(dv_base + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=nd)


@triton.jit
def _dropout_mask_kernel(
    SEED, KEEP, drop_thresh, len_q, len_k, stride_kb, stride_kh, stride_km,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUNDS: tl.constexpr,
):
    """Grid ``(cdiv(len_q, BLOCK_M), H, B)``: writes the keep mask the attention kernels use
    (:func:`_dropout_keep`, same counters) as uint8 into ``KEEP (B, H, len_q, len_k)``."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    seed = tl.load(SEED)
    bh = b * tl.num_programs(1) + h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = KEEP + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    for start_n in range(0, len_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, bh, pid_m * BLOCK_M, cols, drop_thresh, BLOCK_M, ROUNDS, 1)
        tl.store(base + rows[:, None].to(tl.int64) * stride_km + cols[None, :], keep.to(tl.uint8),
                 mask=(rows < len_q)[:, None] & (cols < len_k)[None, :])


# --------------------------------------------------------------------------------------
# Configurations: the autotuner's lists and the heuristic used without autotuning
# --------------------------------------------------------------------------------------


class _DescBlocks:
    """A forward TMA configuration's ``pre_hook`` in the autotuner (:func:`_tuned`): sets its
    tile sizes as the block shapes of the launch's host descriptors (``QD`` rows ``BLOCK_M``,
    ``KD`` / ``VD`` rows ``BLOCK_N``, :func:`_tma_descs`); the autotuner calls it before each
    timing run and launch, and :func:`_launch` does the same before the launches it makes
    itself."""

    def __call__(self, nargs):
        _set_desc_blocks((nargs["QD"], nargs["KD"], nargs["VD"]), nargs["BLOCK_M"], nargs["BLOCK_N"])


_DESC_BLOCKS = _DescBlocks()


def _cfg(bm, bn, w, s, split=False, tma=False):
    kw = {"BLOCK_M": bm, "BLOCK_N": bn}
    if split:  # the dK/dV kernel's SPLIT_M option
        kw["SPLIT_M"] = True
    if tma:  # the TMA option: tiles through tensor descriptors (forward: host ones; dK/dV: made in the kernel)
        kw["TMA"] = True
    return triton.Config(kw, num_warps=w, num_stages=s)


# H100-oriented tiles per BLOCK_D (sane on A100: every entry is compiled for sm_80 too and
# kept under its 163 KB of shared memory by tests/test_attention_compile.py). The first
# entry is the heuristic's choice for long sequences. The BLOCK_D 64 / 128 lists come from
# per-kernel tile sweeps on an H200 (same SMs and clocks as the H100; bf16, B = 4, S = 4096,
# H = 32, benchmarks/sweep_attention_tiles.py, rows in benchmarks/results/attention_tiles.jsonl).
# Forward (git 71fe4ae): 128 x 128 on 8 warps at D = 128 (~494-518 TFLOP/s against ~480-494
# for 128 x 64; at D = 64 128 x 128 was 15% slower than 128 x 64, so not listed there).
# 64 x 64 on 4 warps with 3 stages (two blocks per SM) is not listed: git 5b755ec's sweep
# timed it ahead at D = 128 (522 TFLOP/s dense against 484-513 for 128 x 128 w8 s3; 420
# against 402 on the padded batch), but once listed (git 69fcae8) the autotuner picked it
# at S = 4k and bench_attention timed that forward at 464, below the 498 of 128 x 128 in the
# previous call, and on the padded batch the autotuner kept 128 x 64 w8 s4: no consistent
# gain across calls, so the list stays as timed at 498 / 497 (sweep_attention_tiles.py keeps it
# among its candidates).
# Backward at D = 128 (git c3c84b9, after dS moved first in the 64-row dK/dV tiles and the
# padded layout's query blocks started aligned; TFLOP/s of the whole backward): dK/dV
# 64 x 64 on 4 warps 381 dense / 345 padded, 64 x 128 on 8 warps 366 / 331, its one-stage
# copy 347 / 330, the 32-row tiles 295-305 / 263-272 (64 x 64 on 4 warps measured
# 239-249 at 71fe4ae, before those changes); dQ with dK/dV on 64 x 64: 128 x 64 on 8 warps,
# 3 stages 391 dense / 350 padded, 128 x 128 w8 s2 382 / 342, 64 x 64 w4 s2 370 / 345.
# At D = 64 (c3c84b9) dQ's 64 x 64 w4 s2 led (347); dK/dV's 64 x 64 w4 s3 (367) beat the
# listed 32 x 64 w4 s2 (362) by 1.5% but spills 18-55 STL: not listed.
# Spills: the compile test counts spill stores (STL) in the SASS (cuobjdump's LOCAL never
# showed them) against allowances. Most entries are spill-free; the D = 128 dK/dV list is
# not: its two fastest tiles spill (sm_90, STL over the layout variants: 64 x 64 w4 s2
# 39-78, 64 x 128 w8 s2 27-51; none in the inner loop dense or masked, a few reloads packed),
# because the tiles that spill less (32 key rows) measured 20-25% slower: speed is what the list is for, and
# the allowance pins the count. Spill-free replacements of earlier spilling winners, untimed
# except where said: the D = 64 forward's 128 x 64 on 4 warps (now 8 warps), dK/dV 64 x 64
# on 4 warps at D = 64 (32-row steps within 4% of it, measured), the 3-stage dQ at D = 64
# (2 STL on sm_80) and the BLOCK_D 256 tiles (forward ~30 / ~420 STL on sm_90 / sm_80, dQ
# ~13 / ~600, dK/dV ~1000 / ~3300). Where the shared lists spill on sm_80 (dQ at BLOCK_D
# 128 / 256, the forward at 128 / 256, dK/dV at 128 / 256), the A100 gets its own tiles
# (SM80_CONFIGS below). Still spilling on sm_90 (the compile test's allowances, counted in
# every layout variant: dense, packed, masked, each with and without softcap): dK/dV at
# BLOCK_D 128 (above) and 256 (16 x 64 on 8 warps, ~70 STL, the least of the tiles tried),
# and the masked variant of the 128 x 128 forward (~30 STL, from the loop copy for masks
# with holes, which reads the mask per column) where the mask is not known to be hole-free;
# masks noted hole-free (hf PaddingInfo's left / right padding) compile without that copy
# (MASK_HOLES off) and are spill-free.
# BLOCK_D 32 has one entry: small heads are rare and memory-bound.
# The ``tma`` entries (sm_90 only, 16-bit without dropout, where the tensors suit a tensor
# map: :func:`_tma_ok`) load Q, K and V through host descriptors. Untimed, left to the
# autotuner; chosen by their sm_90 SASS with Triton 3.6 (D = 128, dense): 128 x 128 on 8
# warps 254 -> 220 registers and its key loop 531 -> 488 instructions (the 32 LEA, 16
# LDGSTS and 11 IMAD of the pointer tiles' address arithmetic gone, one more barrier), shared
# memory 224 -> 192 KB; 128 x 64 on 8 warps 180 -> 171 registers, 348 -> 336. Spill-free in
# every layout variant.
FWD_CONFIGS = {
    32: [_cfg(128, 64, 4, 3)],
    64: [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3, tma=True)],
    128: [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(128, 128, 8, 3, tma=True),
          _cfg(128, 64, 8, 3, tma=True)],
    256: [_cfg(64, 32, 8, 2), _cfg(64, 16, 4, 2)],
}
# dQ's ``tma`` entries read K and V through descriptors each program makes for its
# sequence's key span: one loop copy without the masked tail (sm_90, Triton 3.6, D = 128,
# 128 x 64 on 8 warps: 182 -> 165 registers, loop 289 -> 306 instructions with the cap on
# P that the zero rows need, _bwd_scores' CLAMP); untimed, left to the autotuner.
BWD_DQ_CONFIGS = {
    32: [_cfg(64, 64, 4, 2)],
    64: [_cfg(64, 64, 4, 2), _cfg(64, 64, 4, 2, tma=True)],
    128: [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 2), _cfg(128, 64, 8, 3, tma=True)],
    256: [_cfg(64, 32, 8, 2), _cfg(64, 16, 8, 2)],
}
# The last D = 128 entry is a SPLIT_M option (packed / padded layouts: interior query blocks
# without row masks), untimed: chosen by its SASS with Triton 3.6 (loop 484 -> 420
# instructions packed, 533 -> 459 masked, spill-free there), left to the autotuner.
# The ``tma`` entries (sm_90, 16-bit without dropout, q and dO a tensor map can describe)
# read q and dO through descriptors the kernel makes per sequence, bounded to its span:
# every query block runs one copy without row or key masks (P capped at 1 instead, see
# _bwd_scores' CLAMP). Untimed, left to the autotuner; chosen by their sm_90 SASS with
# Triton 3.6 (D = 128, 64 x 64 on 4 warps): the inner loop 747 -> 461 instructions on the
# padded layout, 701 -> 420 packed, 702 -> 420 dense (EVEN_M's pointer loop: 478), its spill
# loads 3 / 6 / 5 -> 0 / 1 / 0 (Triton 3.9: 620 / 564 / 570 -> 387 / 387 / 393); the
# kernel's spill stores 79 -> 21 padded. At D = 64 the pointer tiles' split loops are as
# short; the 64 x 64 TMA tile is spill-free there (its pointer copy spills 51).
BWD_DKDV_CONFIGS = {
    32: [_cfg(64, 64, 4, 2)],
    64: [_cfg(32, 64, 4, 2), _cfg(32, 128, 8, 2), _cfg(32, 64, 4, 3), _cfg(64, 64, 4, 2, tma=True),
         _cfg(32, 64, 4, 2, tma=True)],
    128: [_cfg(64, 64, 4, 2), _cfg(64, 128, 8, 2), _cfg(64, 128, 8, 1), _cfg(32, 64, 4, 2), _cfg(64, 128, 8, 1, split=True),
          _cfg(64, 64, 4, 2, tma=True), _cfg(64, 128, 8, 2, tma=True)],
    256: [_cfg(16, 64, 8, 2)],
}
# The atomic backward's dK/dV kernel (ATOMIC_DQ: it also computes each block's dQ share and
# adds it into an fp32 accumulator): 16-bit inputs without dropout at BLOCK_D 64 and 128,
# the LLM head dims; every other case runs the separate backward. Chosen before any GPU timing: the
# lists hold the candidates that compile with the fewest spills (sm_90, masked softcapped
# variant, STL): at BLOCK_D 64 64 x 128 w8 s1, 64 x 64 w8 s2 and 32 x 128 w8 s2 are
# spill-free (64 x 64 on 4 warps: 66; the three-call full-block loop spilled every tile, so
# the atomic kernel keeps the one masked loop); at BLOCK_D 128 only 32-row tiles are
# spill-free (32 x 128 w8 s1, 32 x 64 w8 s2), and 64-row ones spill (64 x 128 w8 s1: 64 STL
# at D = 80 / 128, 16 without mask and softcap; 64 x 64 w8 s1: 41; before the one-loop
# change 100-150 and 64, two stages 208 / 101), listed because the separate dK/dV kernel's
# 64-row spilling tile ran 1.7-2.2x faster than its 32-row ones.
# Timed at git c3c84b9 (H200, D = 128, S = 4k, whole backward, attention_tiles.jsonl):
# 64 x 128 w8 s1 327 TFLOP/s, 32 x 128 w8 s1 266, 64 x 64 w8 s1 179, 32 x 64 w8 s2 129 (the
# unlisted 64 x 128 w8 s2: 336), all below the separate backward's 381-391 on its 64 x 64
# dK/dV tile: BWD_MODE stays "separate".
BWD_DKDV_ATOMIC_CONFIGS = {
    64: [_cfg(64, 128, 8, 1), _cfg(64, 64, 8, 2), _cfg(32, 128, 8, 2)],
    128: [_cfg(64, 128, 8, 1), _cfg(64, 64, 8, 1), _cfg(32, 128, 8, 1), _cfg(32, 64, 8, 2)],
}
# fp32 inputs run FMA dots ("ieee") on one small tile per kernel and BLOCK_D: correct and
# rarely used, not timed. The FMA dot holds whole BLOCK_D rows per thread, so the former
# 32 x 32 on 4 warps spilled hundreds to thousands of STL from D = 64 up (16 x 16 on 4
# warps too); 16 x 16 on 8 warps spills least, and from BLOCK_D 128 up 2-3 stages spill
# less than one. The dQ kernel still spills at BLOCK_D 128 / 256 (~60 / ~530 STL) and the
# forward at 256 (~80), with and without dropout (the test's allowances); dK/dV has its own
# tiles, spill-free except BLOCK_D 128 with dropout on sm_80 (2 STL).
FP32_CONFIGS = {
    "fwd": {32: [_cfg(16, 16, 8, 1)], 64: [_cfg(16, 16, 8, 1)], 128: [_cfg(16, 16, 8, 2)], 256: [_cfg(16, 16, 8, 3)]},
    "dq": {32: [_cfg(16, 16, 8, 1)], 64: [_cfg(16, 16, 8, 1)], 128: [_cfg(16, 16, 8, 2)], 256: [_cfg(16, 16, 8, 2)]},
    "dkdv": {32: [_cfg(32, 32, 4, 1)], 64: [_cfg(16, 16, 8, 1)], 128: [_cfg(16, 16, 8, 3)], 256: [_cfg(16, 16, 8, 3)]},
}
_TABLES = {"fwd": FWD_CONFIGS, "dq": BWD_DQ_CONFIGS, "dkdv": BWD_DKDV_CONFIGS, "dkdv_atomic": BWD_DKDV_ATOMIC_CONFIGS}
# The A100 (sm_80) runs mma.sync, which has no 64-row warpgroup tile to keep: where the
# shared lists spill there, tiles that replace the list on sm_80 only (16-bit inputs; key:
# kind, BLOCK_D, dropout). Each is spill-free in every layout variant the compile test
# builds (dense, packed, masked; with and without softcap); the entries for BLOCK_D 32 / 64
# and the BLOCK_D 128 forward were re-chosen on 27 Nov, when the test first compiled every
# variant: the former ones spilled 1-14 STL with a mask or in the packed layout (the forward's
# 128 x 64 on 8 warps 10-14 with a mask; of 6 forward candidates only 128 x 32 was clean).
# The BLOCK_D 128 dK/dV keeps the spill-free list sm_90 used before its sweep (the sweep's
# 64 x 128 spills ~1100 STL on sm_80). The others were the largest spill-free tile among
# 4-10 compiled per case (tiles of 16-128 x 16-128, 4-8 warps, 1-3 stages). sm_90 keeps
# the shared lists. Untimed on an A100.
SM80_CONFIGS = {
    ("fwd", 128, False): [_cfg(128, 32, 8, 3)],
    ("dkdv", 128, False): [_cfg(32, 64, 8, 2), _cfg(16, 64, 8, 2), _cfg(16, 128, 8, 2)],
    ("dq", 32, False): [_cfg(64, 64, 4, 3), _cfg(64, 64, 8, 2)],
    ("dq", 64, False): [_cfg(64, 32, 4, 2), _cfg(32, 64, 4, 2)],
    ("dkdv", 32, False): [_cfg(64, 64, 8, 2), _cfg(32, 128, 8, 2)],
    ("dkdv", 64, False): [_cfg(32, 64, 8, 2), _cfg(16, 128, 8, 2), _cfg(16, 64, 4, 2)],
    ("fwd", 256, False): [_cfg(32, 64, 8, 2), _cfg(32, 32, 8, 2)],
    ("fwd", 256, True): [_cfg(32, 64, 8, 2), _cfg(32, 32, 8, 2)],
    ("dq", 128, False): [_cfg(32, 64, 8, 2), _cfg(32, 64, 8, 3)],
    ("dq", 128, True): [_cfg(32, 32, 8, 2)],
    ("dq", 256, False): [_cfg(16, 32, 8, 2), _cfg(16, 16, 8, 2)],
    ("dq", 256, True): [_cfg(16, 32, 8, 2), _cfg(16, 16, 8, 2)],
    ("dkdv", 256, False): [_cfg(16, 32, 8, 2), _cfg(16, 16, 4, 2)],
    ("dkdv", 256, True): [_cfg(16, 32, 8, 1), _cfg(16, 16, 4, 2)],
    # the atomic dK/dV kernel's spill-free tiles on sm_80 (of 10 / 5 compiled; 64-row tiles spill 9-3600 STL,
    # the 32-row ones at BLOCK_D 64 1 STL in the packed layout)
    ("dkdv_atomic", 64, False): [_cfg(16, 128, 8, 2), _cfg(16, 64, 4, 2)],
    ("dkdv_atomic", 128, False): [_cfg(32, 64, 8, 2)],
}
CHIPS = (90, 80)
# Dropout's own lists. The Philox words (interleaved over query rows, then transposed in
# the forward and dQ kernels) add registers and 4-16 KB of shared memory, so the tables
# above would spill or, for the 128 x 128 forward tile, exceed shared memory. Chosen by
# compiling candidates for sm_90 and sm_80 (with and without softcap) and counting spill
# stores (STL) in the SASS (spills show in cuobjdump's STACK, not LOCAL). sm_90: none,
# all with wgmma, except dK/dV at BLOCK_D 256 (~80 STL; the spill-free 32 x 32 tile has no
# wgmma). sm_80: none at BLOCK_D 32 / 64 and for the BLOCK_D 128 forward and dK/dV; no
# candidate was spill-free for dQ at 128 (~160 STL) and 256 (~480), the 256 forward (~140)
# and dK/dV (~15): the compile test's documented allowances, about what the tables above
# spill there without dropout. Not yet timed on a GPU.
DROPOUT_FWD_CONFIGS = {
    32: [_cfg(64, 64, 4, 3)],
    64: [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
    128: [_cfg(128, 32, 8, 3), _cfg(128, 32, 8, 4)],
    256: [_cfg(64, 16, 8, 2)],
}
DROPOUT_DQ_CONFIGS = {
    32: [_cfg(64, 64, 4, 2)],
    64: [_cfg(64, 32, 4, 2)],
    128: [_cfg(64, 32, 8, 2)],
    256: [_cfg(64, 16, 8, 2)],
}
DROPOUT_DKDV_CONFIGS = {
    32: [_cfg(32, 64, 4, 2)],
    64: [_cfg(16, 64, 4, 2)],
    128: [_cfg(16, 64, 8, 2)],
    256: [_cfg(16, 64, 8, 2)],
}
_DROPOUT_TABLES = {"fwd": DROPOUT_FWD_CONFIGS, "dq": DROPOUT_DQ_CONFIGS, "dkdv": DROPOUT_DKDV_CONFIGS}


def _block_d(head_dim: int) -> int:
    return _pow2_at_least(head_dim, 16)


def _pow2_at_least(n: int, floor: int) -> int:
    """The next power of two of ``max(n, floor)`` in plain integer arithmetic (this runs on
    every launch; Triton's ``next_power_of_2`` costs ~12 us a call in Triton 3.9)."""
    return 1 << (max(int(n), floor) - 1).bit_length()


def chip_of(device: torch.device) -> int:
    """The config family of a CUDA device: 90 from compute capability 9 up (wgmma), else 80."""
    return _chip_of_index(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _chip_of_index(index: int) -> int:  # once per device, not on every launch
    return 90 if torch.cuda.get_device_capability(index)[0] >= 9 else 80


def _configs(kind: str, head_dim: int, fp32: bool, dropout: bool = False, chip: int = 90,
             tma: bool = True) -> list[triton.Config]:
    """The list for this case; TMA entries only on sm_90 and where ``tma`` (the launch passes
    descriptors, :func:`_tma_ok`)."""
    bd = _block_d(head_dim)
    if fp32:
        return list(FP32_CONFIGS[kind][bd])
    if chip == 80 and (kind, bd, dropout) in SM80_CONFIGS:
        return list(SM80_CONFIGS[kind, bd, dropout])
    cfgs = (_DROPOUT_TABLES if dropout else _TABLES)[kind][bd]
    return [c for c in cfgs if not c.kwargs.get("TMA") or (tma and chip == 90)]


def fwd_configs(head_dim: int, fp32: bool = False, dropout: bool = False, chip: int = 90) -> list[triton.Config]:
    """Every forward configuration the autotuner may pick for this head dim, input kind and
    chip family (``chip_of``: 90 for H100, 80 for A100), TMA tiles included."""
    return _configs("fwd", head_dim, fp32, dropout, chip)


def bwd_dq_configs(head_dim: int, fp32: bool = False, dropout: bool = False, chip: int = 90) -> list[triton.Config]:
    """Every dQ configuration the autotuner may pick."""
    return _configs("dq", head_dim, fp32, dropout, chip)


def bwd_dkdv_configs(head_dim: int, fp32: bool = False, dropout: bool = False, chip: int = 90) -> list[triton.Config]:
    """Every dK/dV configuration the autotuner may pick."""
    return _configs("dkdv", head_dim, fp32, dropout, chip)


def bwd_dkdv_atomic_configs(head_dim: int, fp32: bool = False, dropout: bool = False, chip: int = 90) -> list[triton.Config]:
    """Every configuration the autotuner may pick for the atomic backward's dK/dV kernel; empty
    where that backward does not run on a GPU (:func:`atomic_bwd_supported`)."""
    if not atomic_bwd_supported(head_dim, fp32, dropout):
        return []
    return _configs("dkdv_atomic", head_dim, fp32, dropout, chip)


def atomic_bwd_supported(head_dim: int, fp32: bool, dropout: bool) -> bool:
    """Whether the atomic backward has GPU tiles for this case (16-bit, no dropout, BLOCK_D 64 /
    128). The interpreter runs it for every case (the tests force it)."""
    return not fp32 and not dropout and _block_d(head_dim) in BWD_DKDV_ATOMIC_CONFIGS


def heuristic_config(
    kind: str, head_dim: int, fp32: bool, max_seqlen: int, on_cuda: bool, dropout: bool = False, chip: int = 90,
    tma: bool = False,
) -> triton.Config:
    """The configuration used when not autotuning (no CUDA, or LLM2VEC_FAST_AUTOTUNE=0).

    On CUDA: the list's first entry (the fastest tile of the H200 measurements at S = 4k,
    without dropout, where a sweep or the autotuner measured it; see the comment above
    ``FWD_CONFIGS``. Every entry of a list is compiled and spill-checked by the compile
    test; with ``dropout`` the first entry of the dropout list, not tuned for it); sequences
    of at most 256 take the smallest tile so that short batches still fill the SMs. No
    benchmarking, so the first call costs only the compile. Without
    CUDA (the interpreter): 32 x 32 tiles (16 x 16 at BLOCK_D 256), so the tests' short
    sequences cross several blocks and a tail, and the interpreter stays fast.
    """
    if not on_cuda:
        return _cfg(32, 32, 4, 1, tma=tma) if _block_d(head_dim) < 256 else _cfg(16, 16, 4, 1, tma=tma)
    cands = _configs(kind, head_dim, fp32, dropout, chip, tma)
    if not cands:  # a list edited to TMA tiles only (the tile sweep) on a launch that cannot take them
        raise ValueError(f"{kind}: no tile for this launch (its list holds only TMA tiles, and this launch "
                         "does not qualify for them: attention._tma_ok)")
    if max_seqlen <= 256:
        return min(cands, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    return cands[0]


def _autotune_on() -> bool:
    return os.environ.get("LLM2VEC_FAST_AUTOTUNE", "1") != "0"


_KERNELS = {"fwd": _attn_fwd_kernel, "dq": _attn_bwd_dq_kernel, "dkdv": _attn_bwd_dkdv_kernel,
            "dkdv_atomic": _attn_bwd_dkdv_kernel}
# Tuned once per kernel, tile table and sequence-length bucket (and, by Triton, per dtype);
# the forward and dQ kernels also per MASK_HOLES (``_autotune_key``), so a hole-free padded
# batch does not inherit the tile chosen for the general copy (on which 128 x 128 spills at
# D = 128), or the other way round; the dK/dV kernels per EVEN_M likewise.
_AUTOTUNE_KEY = ["seqlen_bucket", "IS_VARLEN", "HAS_MASK", "HAS_SOFTCAP", "DROPOUT"]

# The dK/dV kernels' EVEN_M (query blocks without row masks) is decided on the host, before
# the autotuner picks a tile: dense layout and S a multiple of this, which every BLOCK_M of
# their lists divides (tests/test_attention_triton.py checks every list).
EVEN_M_ROWS = 64


def _autotune_key(kind: str) -> list[str]:
    return _AUTOTUNE_KEY + [n for n in ("MASK_HOLES", "EVEN_M") if n in _KERNELS[kind].arg_names]


def _zero_dq(nargs):
    nargs["DQ"].zero_()


@functools.cache
def _tuned(kind: str, head_dim: int, fp32: bool, dropout: bool, chip: int, tma: bool = False):
    cfgs = _configs(kind, head_dim, fp32, dropout, chip, tma)
    if kind == "dkdv_atomic":
        # The kernel adds into DQ: zeroed before every launch, the autotuner's timing runs
        # included (a config's pre_hook runs before each of them and before the real launch).
        cfgs = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_zero_dq) for c in cfgs]
    if kind == "fwd" and tma:
        # the forward's TMA tiles set their descriptors' block shapes before every launch
        cfgs = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_DESC_BLOCKS)
                if c.kwargs.get("TMA") else c for c in cfgs]
    return triton.autotune(configs=cfgs, key=_autotune_key(kind))(_KERNELS[kind])


# The tile each kernel kind last launched with ("fwd" / "dq" / "dkdv" -> "128x64 w8 s3"), so a
# benchmark row can say which configuration the autotuner (or the heuristic) picked.
LAST_TILES: dict = {}


def _launch(kind: str, grid_len: int, grid_rest: tuple, args: list, consts: dict, head_dim: int, fp32: bool,
            max_seqlen: int, on_cuda: bool, descs: tuple | None = None, tma: bool | None = None):
    """Launch one kernel kind on the autotuner's tile or the heuristic's. ``tma``: the launch
    may take the kind's TMA tiles (:func:`_tma_ok`); ``descs``: the forward's host descriptors
    for them (``tma`` defaults to whether they are given)."""
    blk = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    dropout = bool(consts["DROPOUT"])
    chip = chip_of(args[0].device) if on_cuda else 90
    tma = descs is not None if tma is None else tma
    prepare = None
    if tma and on_cuda:
        _ensure_allocator()  # kernels that make descriptors take global scratch from Triton's allocator
    if descs is not None:
        def prepare(c):
            if c.kwargs.get("TMA"):
                _set_desc_blocks(descs, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
    if on_cuda and _autotune_on():
        grid = lambda meta: (cdiv(grid_len, meta[blk]),) + grid_rest  # noqa: E731
        tuner = _tuned(kind, head_dim, fp32, dropout, chip, tma=True) if tma else _tuned(kind, head_dim, fp32, dropout, chip)
        c = launch_tuned(tuner, grid, args, consts, prepare)
        LAST_TILES[kind] = tile_name(c)
        return
    if tma:
        c = heuristic_config(kind, head_dim, fp32, max_seqlen, on_cuda, dropout, chip, tma=True)
    else:
        c = heuristic_config(kind, head_dim, fp32, max_seqlen, on_cuda, dropout, chip)
    LAST_TILES[kind] = tile_name(c)
    if prepare is not None:
        prepare(c)
    grid = (cdiv(grid_len, c.kwargs[blk]),) + grid_rest
    _KERNELS[kind][grid](*args, **consts, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


# --------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------


# Tests set this to fill every buffer the launchers allocate with NaN before the kernels
# run, so an element no kernel writes cannot pass a comparison.
_POISON_OUTPUTS = False


def _alloc(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    t = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return t.fill_(float("nan")) if _POISON_OUTPUTS else t


# Rows past the end of lse2 / delta the TMA dK/dV tiles may read: at least any BLOCK_M.
TAIL_ROWS = 256


def _alloc_tail(like: torch.Tensor, fill: float) -> torch.Tensor:
    """``like``'s shape (contiguous, fp32, poisoned like :func:`_alloc`) over a buffer with
    :data:`TAIL_ROWS` more elements after it, those set to ``fill``."""
    buf = _alloc((like.numel() + TAIL_ROWS,), like, torch.float32)
    buf[like.numel():].fill_(fill)
    return buf[: like.numel()].view(like.shape)


def _lastdim_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides3(t: torch.Tensor, varlen: bool):
    """(batch, token, head) strides; the batch stride is 0 in the packed layout."""
    if varlen:
        return (0, t.stride(0), t.stride(1))
    return (t.stride(0), t.stride(1), t.stride(2))


_RANGE_SLOT: list = [None]
_ORDER_SLOT: list = [None]
_IDENTITY_SLOT: list = [None]

# Programs of the varlen and masked padded layouts take their sequences longest first
# (``_sequence`` reads ``_seq_order``'s permutation): with lengths 30-100% of the longest
# and work per program proportional to the length, list scheduling in a random order left a
# simulated 5-10% tail past the mean load on 264-528 program slots (the B = 16 padded
# benchmark batch, dK/dV's 64-key blocks), longest-first 1.5-4%. False: the identity order
# (same kernels), for the benchmark's ``ours-gridorder``.
LONGEST_FIRST = True


def _mask_range(mask: torch.Tensor):
    """uint8 mask (B, S), int32 ``(B, 3)`` rows ``[lo, hi, holes]`` and the int32 ``(B,)``
    order of the sequences (longest span first) for the kernels.

    ``[lo, hi)`` spans the row's True entries (``[0, 0)`` for a row with none); ``holes``
    is 1 when a False entry lies inside the span. Computed on the device, no host sync,
    once per mask: a patched model passes the same mask object to every layer's forward
    and backward, so the ~15 small ops run once per batch, not twice per layer.
    """
    mask_u8, rng, order = cached(_RANGE_SLOT, mask, lambda: _build_mask_range(mask))
    return mask_u8, rng, order if LONGEST_FIRST else _identity_order(mask)


def _build_mask_range(mask: torch.Tensor):
    m = mask.to(torch.bool)
    lo, hi, holes = ref.mask_spans(m)
    rng = torch.stack([lo, hi, holes.to(lo.dtype)], dim=1).to(torch.int32).contiguous()
    return m.contiguous().view(torch.uint8), rng, _seq_order(hi - lo)


def _seq_order(lengths: torch.Tensor) -> torch.Tensor:
    """int32 permutation of the sequences, longest first (ties keep their order)."""
    return torch.argsort(lengths, descending=True, stable=True).to(torch.int32)


def _identity_order(key: torch.Tensor) -> torch.Tensor:
    """``0 .. n-1`` (batch order) for the mask (B, S) or ``cu_seqlens`` (B + 1,) ``key``, once per object."""
    n = key.shape[0] if key.dim() == 2 else key.numel() - 1
    return cached(_IDENTITY_SLOT, key, lambda: torch.arange(n, device=key.device, dtype=torch.int32))


def _varlen_order(cu_q: torch.Tensor, cu_k: torch.Tensor) -> torch.Tensor:
    """The packed layout's sequence order (longest first by query + key length), once per
    pair of ``cu_seqlens`` objects (a patched model passes one object for both, to every layer
    and the backward)."""
    if not LONGEST_FIRST:
        return _identity_order(cu_q)
    if cu_k is cu_q:
        return cached(_ORDER_SLOT, cu_q, lambda: _seq_order(cu_q[1:] - cu_q[:-1]))
    return cached(_ORDER_SLOT, (cu_q, cu_k), lambda: _seq_order((cu_q[1:] - cu_q[:-1]) + (cu_k[1:] - cu_k[:-1])))


def _mask_holes(mask) -> bool:
    """The forward's and dQ's ``MASK_HOLES``: a mask not known hole-free (``is_hole_free``)
    needs their loop copy that reads the mask per block."""
    return mask is not None and not is_hole_free(mask)


def _layout_args(cu_q, cu_k, mask, dummy):
    """``(mask_u8, range, order, mask batch stride)`` of a launch: the padded layout's mask
    and spans (:func:`_mask_range`), the sequence order where lengths vary, dummies elsewhere."""
    if mask is not None:
        mask_u8, rng, order = _mask_range(mask)
        return mask_u8, rng, order, mask_u8.stride(0)
    if cu_q is not None:
        return dummy, dummy, _varlen_order(cu_q, cu_k), 0
    return dummy, dummy, dummy, 0


def tma_wanted() -> bool:
    """Whether the kernels may take their TMA tiles (``LLM2VEC_FAST_ATTN_TMA``, default on;
    ``0`` keeps the pointer tiles only). Raises ``ValueError`` for another value."""
    want = os.environ.get("LLM2VEC_FAST_ATTN_TMA", "1")
    if want not in ("0", "1"):
        raise ValueError(f"LLM2VEC_FAST_ATTN_TMA: expected 0 or 1, got {want!r}")
    return want == "1"


# Tests set this to run the TMA tiles under the interpreter (which executes descriptor loads
# on the CPU); on a GPU they need sm_90 (:func:`_tma_ok`).
_FORCE_TMA = False


# Sequences shorter than this keep the pointer tiles: there the launch's host time is what
# counts (a small model's step is host-bound), and the forward's host descriptors (three per
# call, encoded by the launcher) and the backward's buffer tails add to it.
TMA_MIN_SEQLEN = 512


def _tma_ok(tensors, fp32: bool, dropout: bool, holes: bool = False, max_seqlen: int = TMA_MIN_SEQLEN) -> bool:
    """Whether a launch over ``tensors`` (those its TMA tiles read: the forward's q, k, v, the
    dQ kernel's k and v, the dK/dV kernel's q and dO) can take TMA tiles: 16-bit inputs
    without dropout (the tiles are listed there only), no mask that may have holes (the
    forward's and dQ's ``MASK_HOLES``: the forward's loop copy for holes spills more with
    TMA tiles), sequences of at least :data:`TMA_MIN_SEQLEN`, on an sm_90+ GPU (or forced,
    for the interpreter tests, at any length), with what a tensor map needs: 16-byte aligned
    bases, unit last stride, the other strides multiples of 16 bytes. Anything else runs the
    pointer tiles."""
    if fp32 or dropout or holes or not tma_wanted():
        return False
    q = tensors[0]
    if not _FORCE_TMA and not (q.is_cuda and chip_of(q.device) == 90 and max_seqlen >= TMA_MIN_SEQLEN):
        return False
    for t in tensors:
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any((st * t.element_size()) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Give Triton an allocator for kernels' global scratch (descriptors made in a kernel)
    where none is set in this thread's context: torch's caching allocator on the current
    device. An allocator the caller set is kept."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # pragma: no cover - another Triton layout: set ours
        pass
    triton.set_allocator(_torch_scratch)


def _tma_descs(q, k, v, varlen: bool):
    """Host descriptors of q, k, v as 4-D ``(B, S, H, D)`` (packed: ``(1, T, H, D)``); their
    block shapes are set per tile (:func:`_set_desc_blocks`) before each launch."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    out = []
    bd = _block_d(q.shape[-1])
    for t in (q, k, v):
        t4 = t.unsqueeze(0) if varlen else t
        out.append(TensorDescriptor(t4, list(t4.shape), list(t4.stride()), [1, 16, 1, bd]))
    return tuple(out)


def _set_desc_blocks(descs, block_m: int, block_n: int) -> None:
    qd, kd, vd = descs
    bd = qd.block_shape[3]
    qd.block_shape = [1, block_m, 1, bd]
    kd.block_shape = vd.block_shape = [1, block_n, 1, bd]


def _seq_bucket(n: int) -> int:
    return _pow2_at_least(n, 16)


# Philox rounds per dropout element: 10 is the Random123 authors' recommended count for
# Philox-4x32 (and tl.rand's default); fewer is faster and weaker.
PHILOX_ROUNDS = 10


def dropout_seed(device) -> torch.Tensor:
    """A fresh Philox key for one attention call: ``(1,)`` int64 on ``device``.

    Drawn from torch's default generator of that device (the CUDA generator on a GPU, no
    host sync), so ``torch.manual_seed`` makes dropout reproducible and restoring the RNG
    state (``torch.utils.checkpoint``, GradCache's replay) reproduces the masks.
    """
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device)


def _dropout_args(dropout_p: float, seed, dummy: torch.Tensor):
    """(seed tensor, drop_thresh int32, drop_scale) for the kernels; see :func:`_dropout_keep`.

    Without dropout the kernels never read ``SEED``: ``dummy`` stands in, no allocation.
    """
    if not dropout_p:
        return dummy, 0, 1.0
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if seed is None or seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != dummy.device:
        raise ValueError(f"seed: expected a (1,) int64 tensor on {dummy.device} (dropout_seed), got {seed!r}")
    thresh = min(round(dropout_p * 2**32), 2**32 - 1) - 2**31
    return seed, int(thresh), 1.0 / (1.0 - dropout_p)


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, len_q: int, len_k: int, dropout_p: float) -> torch.Tensor:
    """The dropout keep mask the kernels use for ``seed``: ``(B, H, len_q, len_k)`` bool.

    Element ``[b, h, i, j]`` says whether query ``i`` of sequence ``b`` (position inside
    the sequence: the row of the padded layout, or ``i`` rows after ``cu_seqlens[b]``),
    query head ``h``, keeps its probability on key ``j``; padding positions have entries
    too, never used. For tests and debugging: the same RNG function as the kernels, so an
    explicit-mask reference reproduces their output and gradients exactly.
    """
    if not dropout_p:
        return torch.ones((batch, heads, len_q, len_k), dtype=torch.bool, device=seed.device)
    seed_t, thresh, _ = _dropout_args(dropout_p, seed, seed)
    keep = torch.zeros((batch, heads, len_q, len_k), dtype=torch.uint8, device=seed.device)
    if keep.numel():
        bm = 32
        grid = (cdiv(len_q, bm), heads, batch)
        _dropout_mask_kernel[grid](
            seed_t, keep, thresh, len_q, len_k, *keep.stride()[:3], BLOCK_M=bm, BLOCK_N=32, ROUNDS=PHILOX_ROUNDS
        )
    return keep.bool()


def attention_forward(
    q, k, v, cu_q, cu_k, mask, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, softcap: float,
    dropout_p: float = 0.0, seed: torch.Tensor | None = None,
):
    """Launch the forward kernel. Varlen when ``cu_q`` is given, else padded.

    ``dropout_p > 0`` needs ``seed`` (:func:`dropout_seed`); the same seed gives the same
    mask. Returns ``out`` (q's shape and dtype) and ``lse`` fp32 (of the undropped
    softmax): ``(H, T_q)`` varlen, ``(B, H, S)`` padded.
    """
    varlen = cu_q is not None
    q, k, v = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    D = q.shape[-1]
    H, Hkv = q.shape[-2], k.shape[-2]
    if varlen:
        B = cu_q.numel() - 1
        S = 0
        out = _alloc(q.shape, q)
        lse = _alloc((H, q.shape[0]), q, torch.float32)
        lse_strides = (0, lse.stride(0))
        grid_len = max_seqlen_q
    else:
        B, S = q.shape[0], q.shape[1]
        out = _alloc(q.shape, q)
        lse = _alloc((B, H, S), q, torch.float32)
        lse_strides = (lse.stride(0), lse.stride(1))
        grid_len = S
    if out.numel() == 0 or B == 0 or grid_len == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    dummy = torch.empty(3, device=q.device, dtype=torch.int32)
    mask_u8, rng, order, stride_mb = _layout_args(cu_q, cu_k, mask, dummy)
    fp32 = q.dtype == torch.float32
    seed_t, thresh, dscale = _dropout_args(dropout_p, seed, dummy)
    holes = _mask_holes(mask)
    tma = _tma_ok((q, k, v), fp32, bool(dropout_p), holes, max(max_seqlen_q, max_seqlen_k, S))
    descs = _tma_descs(q, k, v, varlen) if tma else None
    args = [
        q, k, v, out, lse,
        cu_q if varlen else dummy, cu_k if varlen else dummy, rng, mask_u8, seed_t, order,
        *(descs or (None, None, None)),
        float(softmax_scale), float(softcap) if softcap else 1.0, dscale, S, H // Hkv, thresh,
        _seq_bucket(max(max_seqlen_q, S)),
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
        *lse_strides, stride_mb,
    ]
    consts = dict(
        HEAD_DIM=D, BLOCK_D=_block_d(D), IS_VARLEN=varlen, HAS_MASK=mask is not None,
        HAS_SOFTCAP=bool(softcap), DOT_PREC="ieee" if fp32 else "tf32",
        DROPOUT=bool(dropout_p), ROUNDS=PHILOX_ROUNDS, MASK_HOLES=holes,
    )
    _launch("fwd", grid_len, (H, B), args, consts, D, fp32, max(max_seqlen_q, S), q.is_cuda, descs=descs)
    return out, lse


# The backward's strategy: "separate" (a dQ kernel, then a dK/dV kernel; no atomics, so
# bit-reproducible), "atomic" (one dK/dV kernel that also adds each key block's share of dQ
# into an fp32 accumulator: 5 matmuls per block pair instead of the separate kernels' 7,
# plus a small delta pass; not bit-reproducible), or "auto" (on CUDA, both timed once per
# case and the faster kept; elsewhere separate). The environment variable
# LLM2VEC_FAST_ATTN_BWD overrides this default; ``deterministic=True`` always runs separate,
# and so does every case without atomic GPU tiles (:func:`atomic_bwd_supported`).
# "separate" until the atomic kernel has been timed and checked on a GPU.
BWD_MODE = "separate"
BWD_MODES = ("separate", "atomic", "auto")
_BWD_CHOICE: dict = {}  # "auto"'s timed choice per case


def bwd_mode(deterministic: bool = False, on_cuda: bool = False, head_dim: int = 64, fp32: bool = False,
             dropout: bool = False) -> str:
    """The strategy a backward call will take: ``"separate"``, ``"atomic"`` or ``"auto"`` (see
    ``BWD_MODE``). Raises ``ValueError`` for an unknown LLM2VEC_FAST_ATTN_BWD value."""
    want = os.environ.get("LLM2VEC_FAST_ATTN_BWD", BWD_MODE)
    if want not in BWD_MODES:
        raise ValueError(f"LLM2VEC_FAST_ATTN_BWD: expected one of {', '.join(BWD_MODES)}, got {want!r}")
    if deterministic or want == "separate" or (on_cuda and not atomic_bwd_supported(head_dim, fp32, dropout)):
        return "separate"
    if want == "auto" and not on_cuda:
        return "separate"
    return want


def _timed_choice(key, run) -> str:
    """``"separate"`` or ``"atomic"``, whichever ``run(mode)`` does faster; timed once per key."""
    if key not in _BWD_CHOICE:
        from triton.testing import do_bench

        times = {m: do_bench(lambda m=m: run(m), warmup=5, rep=20) for m in ("separate", "atomic")}
        _BWD_CHOICE[key] = min(times, key=times.get)
    return _BWD_CHOICE[key]


# Rows per program of the atomic backward's delta pass (the dQ kernel with DELTA_ONLY;
# memory-bound: one fixed config).
DELTA_BLOCK_M = 64
DELTA_WARPS = 4


def attention_backward(
    do, q, k, v, out, lse, cu_q, cu_k, mask, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
    softcap: float, dropout_p: float = 0.0, seed: torch.Tensor | None = None, deterministic: bool = False,
    mode: str | None = None,
):
    """Launch the backward: the dQ kernel (which writes delta) and then the dK/dV kernel, or,
    in the atomic mode, the dQ kernel's delta pass and the dK/dV kernel that also accumulates dQ.

    ``dropout_p`` and ``seed`` must be the forward's: the kernels regenerate its mask.
    ``mode`` ``"separate"`` / ``"atomic"`` forces a strategy (tests, benchmarks); None takes
    :func:`bwd_mode`'s. Returns ``dq, dk, dv`` with the shapes and dtypes of ``q, k, v``.
    """
    varlen = cu_q is not None
    do, q, k, v, out = (_lastdim_contig(t) for t in (do, q, k, v, out))
    D = q.shape[-1]
    H, Hkv = q.shape[-2], k.shape[-2]
    fp32 = q.dtype == torch.float32
    if mode is None:
        mode = bwd_mode(deterministic, q.is_cuda, D, fp32, bool(dropout_p))
    elif mode not in ("separate", "atomic"):
        raise ValueError(f"mode: expected 'separate', 'atomic' or None, got {mode!r}")
    if varlen:
        B, S = cu_q.numel() - 1, 0
        lse_strides = (0, lse.stride(0))
        len_q, len_k = max_seqlen_q, max_seqlen_k
    else:
        B, S = q.shape[0], q.shape[1]
        lse_strides = (lse.stride(0), lse.stride(1))
        len_q = len_k = S
    if mode == "auto":
        key = (chip_of(q.device), D, q.dtype, varlen, mask is not None, bool(softcap), H // Hkv,
               _seq_bucket(max(len_q, len_k)))
        mode = _timed_choice(key, lambda m: attention_backward(
            do, q, k, v, out, lse, cu_q, cu_k, mask, max_seqlen_q, max_seqlen_k, softmax_scale, softcap,
            dropout_p, seed, mode=m,
        ))
    atomic = mode == "atomic"
    dq = None if atomic else _alloc(q.shape, q)
    dk = _alloc(k.shape, k)
    dv = _alloc(v.shape, v)
    tma = not atomic and _tma_ok((q, do), fp32, bool(dropout_p), max_seqlen=max(len_q, len_k))
    if tma:
        # The TMA dK/dV tiles read lse2 and delta unmasked, up to a block past the last row:
        # a tail of (+inf, 0) makes those rows' terms exact zeros.
        delta, lse2 = _alloc_tail(lse, 0.0), _alloc_tail(lse, float("inf"))
    else:
        delta = _alloc(lse.shape, lse)
        lse2 = _alloc(lse.shape, lse)  # written by the dQ kernel / delta pass, read by dK/dV
    autotuned = q.is_cuda and _autotune_on()
    if atomic:
        # fp32 accumulator of dQ (already scaled by softmax_scale); zeroed here, or by the
        # autotuner's pre-hook before every launch of the tuned kernel.
        acc = (torch.empty if autotuned else torch.zeros)(q.shape, device=q.device, dtype=torch.float32)
    if B == 0 or q.numel() == 0 or len_q == 0 or len_k == 0:
        dk.zero_(), dv.zero_()
        return (q.new_zeros(q.shape) if atomic else dq.zero_()), dk, dv
    dummy = torch.empty(3, device=q.device, dtype=torch.int32)
    mask_u8, rng, order, stride_mb = _layout_args(cu_q, cu_k, mask, dummy)
    seed_t, thresh, dscale = _dropout_args(dropout_p, seed, dummy)
    consts = dict(
        HEAD_DIM=D, BLOCK_D=_block_d(D), IS_VARLEN=varlen, HAS_MASK=mask is not None,
        HAS_SOFTCAP=bool(softcap), DOT_PREC="ieee" if fp32 else "tf32",
        DROPOUT=bool(dropout_p), ROUNDS=PHILOX_ROUNDS,
    )
    common = [
        float(softmax_scale), float(softcap) if softcap else 1.0, dscale, S, H // Hkv, thresh,
        _seq_bucket(max(max_seqlen_q, max_seqlen_k, S)),
    ]
    cus = [cu_q if varlen else dummy, cu_k if varlen else dummy, rng, mask_u8, seed_t, order]
    dq_arg, dq_strides = (acc, _strides3(acc, varlen)) if atomic else (dq, _strides3(dq, varlen))
    args = [
        q, k, v, out, do, dq_arg, lse, lse2, delta, *cus, *common,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
        *_strides3(do, varlen), *dq_strides, *lse_strides, stride_mb,
    ]
    if atomic:
        # delta only: the dQ kernel stopped after its first step, one fixed small config
        _KERNELS["dq"][(cdiv(len_q, DELTA_BLOCK_M), H, B)](
            *args, **consts, DELTA_ONLY=True, BLOCK_M=DELTA_BLOCK_M, BLOCK_N=16, num_warps=DELTA_WARPS,
        )
    else:
        holes = _mask_holes(mask)
        _launch("dq", len_q, (H, B), args, dict(consts, MASK_HOLES=holes), D, fp32, max(max_seqlen_q, S),
                q.is_cuda, tma=_tma_ok((k, v), fp32, bool(dropout_p), holes, max(len_q, len_k)))
    args = [
        q, k, v, do, dk, dv, dq_arg, lse2, delta, *cus, *common,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen),
        *_strides3(dk, varlen), *_strides3(dv, varlen), *dq_strides, *lse_strides, stride_mb,
    ]
    kind = "dkdv_atomic" if atomic else "dkdv"
    even_m = not fp32 and not varlen and mask is None and S % EVEN_M_ROWS == 0
    _launch(kind, len_k, (Hkv, B), args, dict(consts, ATOMIC_DQ=atomic, EVEN_M=even_m), D, fp32, max(max_seqlen_k, S),
            q.is_cuda, tma=tma)
    if atomic:
        dq = acc if fp32 else acc.to(q.dtype)
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile, with fake shapes) and autograd
# --------------------------------------------------------------------------------------


@torch.library.custom_op("llm2vec_fast::attn_fwd", mutates_args=())
def _attn_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, mask: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, softcap: float,
    dropout_p: float = 0.0, seed: torch.Tensor | None = None, deterministic: bool = False, fresh: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    # deterministic only matters to the backward (setup_context keeps it). fresh: a direct call
    # of a public op inside a compiled graph, which starts its generation here, at run time
    # (``_tensor_cache.new_generation`` does nothing while tracing)
    if fresh:
        new_generation()
    return attention_forward(q, k, v, cu_q, cu_k, mask, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, dropout_p, seed)


@_attn_fwd_op.register_fake
def _(q, k, v, cu_q, cu_k, mask, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, dropout_p=0.0, seed=None,
      deterministic=False, fresh=False):
    H = q.shape[-2]
    if cu_q is not None:
        lse = q.new_empty((H, q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], H, q.shape[1]), dtype=torch.float32)
    return q.new_empty(q.shape), lse  # contiguous, as attention_forward's (not q's strides)


@torch.library.custom_op("llm2vec_fast::attn_bwd", mutates_args=())
def _attn_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, mask: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, softcap: float,
    dropout_p: float = 0.0, seed: torch.Tensor | None = None, deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(
        do, q, k, v, out, lse, cu_q, cu_k, mask, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, dropout_p, seed,
        deterministic,
    )


@_attn_bwd_op.register_fake
def _(do, q, k, v, out, lse, cu_q, cu_k, mask, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, dropout_p=0.0, seed=None,
      deterministic=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the launcher's


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, mask, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, dropout_p, seed, deterministic = inputs[:13]
    out, lse = output
    # The seed (not the mask) is what backward needs to regenerate the forward's dropout mask.
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, mask, seed)
    ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, softcap, dropout_p)
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse, bwd=None):
    """dq, dk, dv through ``bwd``: the custom op (compiled graphs) or the bare launcher."""
    q, k, v, out, lse, cu_q, cu_k, mask, seed = ctx.saved_tensors
    dq, dk, dv = (bwd or _attn_bwd_op)(
        dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out, lse, cu_q, cu_k, mask, *ctx.args, seed,
        ctx.deterministic,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _AttnFn(torch.autograd.Function):
    """The same forward / backward as the custom ops, for eager mode: the custom op's
    dispatch (argument defaults, redispatch, alias checks) was ~2/3 of the glue per call
    (155 -> 64 us per forward + backward, measured on a CPU with the kernels stubbed), paid by
    every layer once forward, once in a checkpoint's recompute and once backward.
    torch.compile still sees the custom op."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, mask, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, dropout_p, seed,
                deterministic):
        out, lse = attention_forward(
            q, k, v, cu_q, cu_k, mask, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, dropout_p, seed
        )
        _setup_context(ctx, (q, k, v, cu_q, cu_k, mask, max_seqlen_q, max_seqlen_k, softmax_scale, softcap,
                             dropout_p, seed, deterministic), (out, lse))
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: an error, not lost terms
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse, attention_backward)[:13]  # (no fresh argument here)


def _attn(q, k, v, cu_q, cu_k, mask, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, dropout_p, seed,
          deterministic=False, fresh=False):
    """Forward with autograd: the custom op under torch.compile (opaque, with a fake), else the
    plain autograd function, or the bare launcher when no gradient is recorded. ``fresh``: a
    direct call of a public op, whose generation the custom op starts at run time (in eager
    mode the public op already started it)."""
    args = (q, k, v, cu_q, cu_k, mask, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, dropout_p, seed)
    if torch.compiler.is_compiling():
        return _attn_fwd_op(*args, deterministic, fresh)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        bwd_mode(deterministic)  # a bad LLM2VEC_FAST_ATTN_BWD fails here, before any kernel runs
        return _AttnFn.apply(*args, deterministic)
    return attention_forward(*args)


# --------------------------------------------------------------------------------------
# The contract ops/attention.py calls
# --------------------------------------------------------------------------------------


def _seed_for(dropout_p: float, q: torch.Tensor):
    return dropout_seed(q.device) if dropout_p > 0 else None


def flash_attn_varlen_triton(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, softcap,
    *, dropout_p=0.0, return_lse=False, deterministic=False, fresh=False,
):
    """Varlen non-causal attention (arguments validated by ops/attention.py).

    q ``(T_q, H, D)``, k/v ``(T_k, Hkv, D)`` fp16 / bf16 / fp32, cu_seqlens ``(B+1,)`` int32,
    max_seqlen Python ints (upper bounds). ``dropout_p`` in ``[0, 1)``: attention dropout
    in the kernels, its seed drawn from torch's generator of q's device on each call
    (:func:`dropout_seed`). Returns out ``(T_q, H, D)`` in q's dtype and, with
    ``return_lse``, lse ``(H, T_q)`` fp32 of the undropped softmax (not differentiable).
    Differentiable w.r.t. q, k, v. ``deterministic=True`` runs the separate backward (no
    atomics: bit-reproducible); otherwise the backward takes ``bwd_mode()``'s strategy.
    """
    dropout_p = float(dropout_p or 0.0)
    out, lse = _attn(
        q, k, v, cu_seqlens_q, cu_seqlens_k, None, int(max_seqlen_q), int(max_seqlen_k), float(softmax_scale),
        float(softcap or 0.0), dropout_p, _seed_for(dropout_p, q), bool(deterministic), bool(fresh),
    )
    return (out, lse) if return_lse else out


def flash_attn_padded_triton(
    q, k, v, key_padding_mask, softmax_scale, softcap, *, dropout_p=0.0, return_lse=False, deterministic=False,
    fresh=False,
):
    """Padded non-causal attention with any key padding pattern, read by the kernels directly.

    q ``(B, S, H, D)``, k/v ``(B, S, Hkv, D)``, key_padding_mask ``(B, S)`` bool / 0-1 ints
    (True = valid) or None; ``dropout_p`` as in :func:`flash_attn_varlen_triton`. Returns
    out ``(B, S, H, D)`` (padded query rows 0) and, with ``return_lse``, lse ``(B, H, S)``
    fp32 (``-inf`` on padding). ``deterministic`` as in :func:`flash_attn_varlen_triton`.
    """
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool)
    S = q.shape[1]
    dropout_p = float(dropout_p or 0.0)
    out, lse = _attn(
        q, k, v, None, None, mask, S, S, float(softmax_scale), float(softcap or 0.0), dropout_p, _seed_for(dropout_p, q),
        bool(deterministic), bool(fresh),
    )
    return (out, lse) if return_lse else out

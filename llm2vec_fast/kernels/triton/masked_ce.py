"""Masked linear cross-entropy (the MNTP loss) in Triton, without ever holding ``[N, V]`` logits.

Shape letters: ``B`` batch, ``T`` tokens per sequence, ``N`` labelled rows after the shift,
``C`` hidden size, ``V`` vocabulary, ``S`` vocabulary splits of the forward, ``Vc`` the
vocabulary chunk of the backward.

Design (why it is built this way):

* Gather first. ``reference.labelled_rows`` finds the rows that carry a label (the shift
  applied to the row indices, so hidden is never sliced or copied) and the autograd
  function gathers them, so every GEMM below scales with labelled tokens (~20% for MNTP);
  it keeps no gathered copy for the backward and builds hidden's gradient once.
  ``torch.nonzero`` inside it is the op's one host synchronisation: ``N`` decides every
  later shape. Nothing else here syncs (no ``.item()``, no data-dependent Python branch).
* Forward: ``_mce_fwd_kernel`` is a tiled GEMM ``h @ w.T`` (fp32 accumulator, ``tl.dot``)
  whose epilogue never stores logits: per row it keeps an online log-sum-exp (running max
  and rescaled sum of exponentials), the target logit, the sum of logits (label smoothing)
  and the running argmax (accuracy). The grid is (row blocks, ``S`` vocabulary splits);
  each program walks its split's vocabulary blocks, so the partial statistics are ``[S, N]``
  (``S`` <= 64), not ``[N, V / BLOCK_N]``. A few PyTorch ops combine the splits. The
  splits are cut in multiples of 256 columns, independent of the autotuned ``BLOCK_N``, so
  every configuration writes every partial and autotuning cannot leave stale entries.
  With d weight wanted (``GEMM_FORWARD``, ``masked_ce_forward_gemm``) the two-pass forward
  instead makes fp32 logits of whole rows on cuBLAS, in chunks of rows that take at most d
  weight's bytes, and reduces them with the eager strategy's row kernel (statistics only):
  on the H200 run below the Triton forward ran 350-390 TFLOP/s where cuBLAS ran ~590 on the
  eager strategy's smaller chunks. Untimed as a whole (see "Tried and not kept").
* Backward: chunked over the vocabulary in the launcher. For each chunk ``[v0, v0 + Vc)``
  ``_mce_bwd_kernel`` recomputes the logits tile by tile with the same GEMM and turns them
  into ``d logits`` in registers (softmax, smoothing, z-loss, softcap derivative), storing
  them once in the input dtype into a ``[N, Vc]`` buffer (``N * Vc`` is capped by
  ``MAX_CHUNK_ELEMS``: bounded memory, never ``[N, V]``). The two big GEMMs then run on
  cuBLAS: ``dW[v0:v0+Vc] = dZ.T @ h`` (each chunk owns its rows of ``dW``: no cross-chunk
  accumulation, deterministic) and ``dH += dZ @ W[v0:v0+Vc]`` into an fp32 accumulator
  (``N x C``, small). ``db`` is a column sum of the same buffer. With d hidden wanted
  (``IN_GRAD``, ``two_pass_plan``) the gathered rows, the accumulator and the dZ buffer live
  in hidden's gradient buffer, past the first ``N`` rows that receive d hidden before it
  moves into place, as in the eager strategy below. Computing ``dZ`` once
  and reusing it for ``dH``, ``dW`` and ``db`` costs 4 GEMMs of ``N x C x V`` per step
  (forward, recompute, dH, dW); weights that need no gradient (a frozen LM head under
  LoRA) skip the dW GEMM.
* Eager strategy (``masked_ce_eager``; ``strategy="eager"``, or ``"auto"`` when it pays):
  when gradients will be wanted, the forward computes them at once from materialised
  logits, saving the backward's recompute GEMM. Per chunk of rows (never ``[N, V]``; evened
  out over the chunks and aligned to 64 rows, ``eager_plan``): ``Z = h_c @ w.T`` on cuBLAS
  with fp32 output, ``_mce_rows_kernel`` (one program per row, two passes over it:
  statistics, then ``dz`` written over ``Z``'s own storage), then ``dH_c = dz @ w`` and
  ``dW += dz.T @ h_c`` on cuBLAS. With d hidden wanted (``IN_GRAD``), hidden's whole
  gradient is built right there: the labelled rows' gradients fill its first rows, each
  chunk's logits and gathered rows use the unlabelled rows' room (as many rows as fit), and
  the rows move into place at the end (``_place_rows``, one kernel, no copy), so the op
  allocates no more than the gradients themselves and vectors of the labelled rows
  (cut-cross-entropy's footprint). Otherwise a
  chunk is a buffer of its own of at most ``EAGER_CHUNK_ELEMS // V`` rows (64 MB fp32).
  That is 3 GEMMs of ``N x C x V`` with d weight and 2 without (a frozen LM head, the LoRA
  MNTP recipe) instead of 4 and 3. The gradients are those of ``sum(loss)``
  (unit scale keeps fp16 ``dz`` out of the subnormals); the backward multiplies them by the
  upstream gradient (and mean's ``1 / N``) in place. d weight sums over rows, so eager with
  d weight needs reduction mean / sum, and each extra row chunk re-reads and re-writes
  ``dW`` (one more rounding in 16 bits): ``"auto"`` takes eager for a frozen head, and with
  d weight where the chunks are few and large enough to repay that traffic (``choose_strategy``:
  ``EAGER_MIN_W_ROWS``, ``EAGER_MAX_W_CHUNKS``). Measured on an H200 (bf16, C = 4096, 16k
  tokens, 20% labelled, git c3c84b9): V = 32000 eager 6.5 ms vs two-pass 8.1 with d weight,
  4.3 vs 6.7 frozen; V = 128256 frozen 15.4 vs 23.4, with d weight two-pass (28.4 vs eager's
  31.3: 18 chunks of 192 rows).
* Stored eager (``EAGER_STORED``, :func:`stored_plan`): with d weight wanted, at most C
  labelled rows and more than one row chunk (:func:`eager_stored_plan`), eager keeps every
  labelled row's dz (input dtype) in d weight's own buffer, in vocabulary blocks, and makes
  d weight once after the row loop, block by block in an order that never overwrites a
  block before it is read: 3 GEMMs, dW written and rounded once, the large chunked-eager dW
  traffic gone (13.8 of 31.3 ms at V = 128256 on the H200), nothing allocated beyond the
  gradients. Untimed on a GPU; the benchmark's ``strategy-eager-chunked`` provider times the
  chunked form beside it.
* Precision: fp32 accumulation everywhere; fp32 inputs use ``input_precision="ieee"`` so
  the CPU interpreter and the GPU agree with the fp32 oracle. bf16 ``tl.dot`` is wrong in
  the interpreter, so bf16 is tested on the GPU only.
* Measured (one H200, bf16, C = 4096, 16k tokens, 20% labelled, forward + backward; rows in
  benchmarks/results/masked_ce.jsonl, git c3c84b9): V = 32000 with d weight 6.35 ms (eager)
  vs full-logits PyTorch 25.7, Liger 18.6, cut-cross-entropy 17.4-17.7; frozen 4.14 vs
  19.9 / 12.8 / 10.3-10.4; V = 128256 with d weight 28.6 (two-pass) vs 110.1 / 86.8 /
  40.0-40.4, frozen 15.7 (eager) vs 84.2 / 52.2 / 27.4-28.2. Peak memory then: the gradients,
  the labelled rows' vectors and a <= 1 MiB copy (129.1 MiB frozen at V = 32000 against
  cut-cross-entropy's 256.5 on flattened shifted rows and 128.4 with its own ``shift``); the
  row move has since become a kernel without that copy (``_move_rows_kernel``, untimed).
* Tried and not kept: vocabulary-chunked cuBLAS logits (fp32 output) streamed through small
  Triton stats / d-logits kernels whose partial statistics were combined across chunks. It
  was 2-5% faster on the H200 (against the Triton tiles of that time) but returned
  non-finite losses at C = 4096 once the vocabulary took two chunks (cause not found in the
  GPU time available). The GEMM forward above chunks rows instead, over the whole
  vocabulary, with the row kernel the eager strategy runs on the GPU: no cross-chunk
  combine.
* Configs: on CUDA the kernels are autotuned over ``FWD_CONFIGS`` / ``BWD_CONFIGS``
  (H100-oriented, wgmma-sized tiles; the compile test compiles exactly these lists for
  sm_90 and sm_80). Without a CUDA device (``TRITON_INTERPRET=1``) a fixed small config
  is launched because the autotuner needs an active driver.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import reference as ref
from ._tiles import cdiv, launch_tuned, next_power_of_2, tile_name

# Splits are cut in multiples of this many columns, a multiple of every BLOCK_N below.
SPLIT_ALIGN = 256
MAX_SPLITS = 64
# The backward's dZ buffer holds at most this many elements (32 MB in bf16).
MAX_CHUNK_ELEMS = 1 << 24


def _cfg(bm, bn, bk, warps, stages):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


# Every list is free of register spills on sm_90 and sm_80 (the compile test counts spill
# stores, STL, in the SASS; cuobjdump's LOCAL stays 0 when ptxas spills). The forward
# epilogue keeps a few [BLOCK_M, BLOCK_N] fp32 temporaries alive: 128x128 tiles spilled
# there (1-7 STL on sm_90, ~130 on sm_80, 16 warps included), and so did 64x128 on 4 warps,
# so its tiles hold 8K accumulator elements on 8 warps (two warpgroups of 64 rows for wgmma
# at 128x64). The backward's 128x256 on 8 warps spilled (53 / 92 STL) and became 64x256.
# 128x128x64 in 4 stages = 128 KB of smem fits H100 (227 KB) and A100 (163 KB). No
# autotune winners are recorded for these kernels; the replacements are not yet timed on
# a GPU.
FWD_CONFIGS = [
    _cfg(128, 64, 64, 8, 4),
    _cfg(128, 64, 64, 8, 3),
    _cfg(64, 128, 64, 8, 4),
]
BWD_CONFIGS = [
    _cfg(128, 128, 64, 8, 4),
    _cfg(64, 256, 64, 8, 3),
    _cfg(64, 128, 64, 4, 4),
]
# fp32 inputs (ieee tl.dot, 4-byte tiles): BLOCK_K 32 keeps 3 stages at 48-64 KB of smem
# on A100 as well as H100. The forward needs 8 warps for its tiles not to spill (64x128
# on 4 warps: 70 / 182 STL on sm_90 / sm_80, 128x128 on 8: 38 / 150). Every entry is
# spill-free in every combination of bias, softcap and smoothing (the compile test builds
# them all): the former 128x64 forward tile spilled 5 STL on sm_90 with smoothing and no
# softcap, and the backward's 64x128 on 4 warps 3 without bias (4 more forward tiles tried
# spilled 13-25 somewhere), so they were dropped or moved to 8 warps.
FWD_CONFIGS_FP32 = [
    _cfg(64, 128, 32, 8, 3),
]
BWD_CONFIGS_FP32 = [
    _cfg(64, 128, 32, 8, 3),
    _cfg(128, 128, 32, 8, 3),
]
# Interpreter (no CUDA device): every tl.dot dimension >= 16, small enough to be quick.
INTERPRET_CONFIG = _cfg(64, 128, 64, 4, 1)


def _triton_configs(cfgs):
    return [
        triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK")}, num_warps=c["num_warps"], num_stages=c["num_stages"])
        for c in cfgs
    ]


@triton.jit
def _softcap(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """``softcap * tanh(z / softcap)`` and the tanh (``z`` and ``z`` unchanged without a softcap).
    tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits +-1 when exp over/underflows."""
    t = z
    if HAS_SOFTCAP:
        t = 1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0)
        z = softcap * t
    return z, t


@triton.jit
def _dlogits(z, t, lse, g, is_target, smoothing, z_loss, V, HAS_SOFTCAP: tl.constexpr):
    """``d (g * loss) / d z_raw`` (broadcasting): ``g * [softmax(z) * (1 + 2 z_loss lse) - (1 - eps)
    onehot(y) - eps / V]``, times the softcap derivative ``1 - t^2`` when a softcap is set."""
    dz = tl.exp(z - lse) * (g * (1.0 + 2.0 * z_loss * lse)) - (smoothing / V) * g
    dz -= tl.where(is_target, (1.0 - smoothing) * g, 0.0)
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    return dz


@triton.jit
def _tile_logits(
    H, W, Bias, rows, cols, row_ok, col_ok, C, stride_h, stride_w, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """fp32 logits of one [BLOCK_M, BLOCK_N] tile (bias and softcap applied) and tanh(z/cap)."""
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = H + rows.to(tl.int64)[:, None] * stride_h + ks[None, :]
    # W is loaded directly as a [BLOCK_K, BLOCK_N] tile (no tl.trans): the same wgmma on the
    # GPU, and a contiguous array for numpy's BLAS in the interpreter (10x faster there).
    w_ptrs = W + cols.to(tl.int64)[None, :] * stride_w + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, C, BLOCK_K):
        if EVEN_K:
            h = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k + ks) < C
            h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return _softcap(acc, softcap, HAS_SOFTCAP)


@triton.jit
def _mce_fwd_kernel(
    H, W, Bias, Y, Stats, Arg,
    N, V, C, stride_h, stride_w, split_cols, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTH: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Partial per-row statistics over one vocabulary split.

    Stats ``(5, S, N)`` fp32: running max, sum of exp(z - max), target logit, sum of
    logits, best logit; Arg ``(S, N)`` int32 argmax column. Program (m, s) covers rows
    ``[m * BLOCK_M, ...)`` and columns ``[s * split_cols, (s + 1) * split_cols) & [0, V)``.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    S = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    y = tl.load(Y + rows, mask=row_ok, other=-1)
    c0 = pid_s * split_cols
    c1 = tl.minimum(c0 + split_cols, V)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), tl.float32)
    zy = tl.zeros((BLOCK_M,), tl.float32)
    zsum = tl.zeros((BLOCK_M,), tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_M,), tl.int32)
    for n0 in range(c0, c1, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < c1
        z, _t = _tile_logits(
            H, W, Bias, rows, cols, row_ok, col_ok, C, stride_h, stride_w, softcap,
            HAS_BIAS, HAS_SOFTCAP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
        )
        z = tl.where(col_ok[None, :], z, float("-inf"))
        blk_max = tl.max(z, axis=1)
        # Every block has >= 1 valid column, so m_new is finite and exp(m_i - m_new) is 0
        # on the first block (m_i = -inf), never NaN.
        m_new = tl.maximum(m_i, blk_max)
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        if HAS_SMOOTH:
            zsum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
        blk_arg = tl.argmax(z, axis=1, tie_break_left=True).to(tl.int32) + n0
        # Strict '>' keeps the earliest column on ties, as torch.argmax does.
        upd = blk_max > best
        best = tl.where(upd, blk_max, best)
        arg = tl.where(upd, blk_arg, arg)
    off = pid_s * N + rows
    plane = S * N
    tl.store(Stats + off, m_i, mask=row_ok)
    tl.store(Stats + plane + off, s_i, mask=row_ok)
    tl.store(Stats + 2 * plane + off, zy, mask=row_ok)
    tl.store(Stats + 3 * plane + off, zsum, mask=row_ok)
    tl.store(Stats + 4 * plane + off, best, mask=row_ok)
    tl.store(Arg + off, arg, mask=row_ok)


@triton.jit
def _mce_bwd_kernel(
    H, W, Bias, Y, Lse, G, DZ,
    N, V, C, v0, v1, stride_h, stride_w, stride_dz, softcap, smoothing, z_loss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """d loss / d logits for columns ``[v0, v1)`` into DZ ``(N, v1 - v0)`` (row stride stride_dz).

    dz = g * [softmax(z) * (1 + 2 z_loss lse) - (1 - eps) onehot(y) - eps / V], times the
    softcap derivative 1 - tanh(z_raw / cap)^2 when a softcap is set.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cols = v0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < v1
    z, t = _tile_logits(
        H, W, Bias, rows, cols, row_ok, col_ok, C, stride_h, stride_w, softcap,
        HAS_BIAS, HAS_SOFTCAP, IEEE, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
    )
    y = tl.load(Y + rows, mask=row_ok, other=-1)
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    dz = _dlogits(z, t, lse[:, None], g[:, None], cols[None, :] == y[:, None], smoothing, z_loss, V, HAS_SOFTCAP)
    out = DZ + rows.to(tl.int64)[:, None] * stride_dz + (cols - v0)[None, :]
    tl.store(out, dz.to(DZ.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _row_logits(z_row, Bias, cols, ok, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Logits at ``cols`` of one materialised row (bias and softcap applied) and tanh(z / cap)."""
    z = tl.load(z_row + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        z += tl.load(Bias + cols, mask=ok, other=0.0).to(tl.float32)
    return _softcap(z, softcap, HAS_SOFTCAP)


@triton.jit
def _mce_rows_kernel(
    Z, Bias, Y, DZ, Loss, Lse, Arg, DZT, DZB,
    V, stride_z, stride_dz, softcap, smoothing, z_loss, N_all, row0, Vt, vc_log2,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTH: tl.constexpr, BLOCK_V: tl.constexpr,
    WRITE_DZ: tl.constexpr, STORE_BLOCKS: tl.constexpr, STAGES: tl.constexpr,
):
    """One row of materialised fp32 logits: its loss, lse, argmax and (``WRITE_DZ``) ``d loss / d z``.

    Program r reads ``Z[r, :V]`` (raw ``h @ w.T``; bias and softcap are applied here) twice:
    pass 1 keeps the online log-sum-exp, the target and summed logits and the argmax, pass 2
    writes dz in DZ's dtype to ``DZ[r, :V]``. DZ may alias Z's storage (the eager strategy
    writes dz over each fp32 row: in place for fp32, over the row's first half for 16 bits).
    That is safe because a program only touches its own row, every store of pass 2's block
    ``j`` lands in fp32 columns ``< (j + 1) * BLOCK_V`` (16-bit column c lies in fp32 column
    c / 2), which every thread has read by then, and the barrier before each block's store
    makes "every thread": without it one warp could overwrite block j (or the target logit)
    before another warp has loaded it. Later blocks' loads never meet earlier stores.

    ``STORE_BLOCKS`` (the stored eager strategy, :func:`stored_plan`): pass 2 also stores dz
    of labelled row ``row0 + r`` (of ``N_all``) in the vocabulary-blocked layout: columns
    ``[0, Vt)`` into ``DZT`` ``(N_all, Vt)``, column block ``j`` (columns ``Vt + j * Vc`` on,
    ``Vc = 2 ** vc_log2``, the last block narrower) into ``DZB`` at ``j * N_all * Vc`` as an
    ``(N_all, width_j)`` matrix. Neither may overlap Z or DZ.
    """
    r = tl.program_id(0)
    z_row = Z + r.to(tl.int64) * stride_z
    dz_row = DZ + r.to(tl.int64) * stride_dz
    y = tl.load(Y + r)
    offs = tl.arange(0, BLOCK_V)
    m_i = float("-inf")
    s_i = 0.0
    zsum = 0.0
    best = float("-inf")
    arg = 0
    for v0 in tl.range(0, V, BLOCK_V, num_stages=STAGES):
        cols = v0 + offs
        ok = cols < V
        z, _t = _row_logits(z_row, Bias, cols, ok, softcap, HAS_BIAS, HAS_SOFTCAP)
        if HAS_SMOOTH:
            zsum += tl.sum(tl.where(ok, z, 0.0), axis=0)
        z = tl.where(ok, z, float("-inf"))
        blk_max = tl.max(z, axis=0)
        # Every block has >= 1 valid column: m_new is finite, exp(m_i - m_new) is 0 at first.
        m_new = tl.maximum(m_i, blk_max)
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m_i = m_new
        blk_arg = tl.argmax(z, axis=0, tie_break_left=True).to(tl.int32) + v0
        # strict '>' keeps the earliest column on ties, as torch.argmax does
        arg = tl.where(blk_max > best, blk_arg, arg)
        best = tl.maximum(best, blk_max)
    lse = m_i + tl.log(s_i)
    zy, _ty = _row_logits(z_row, Bias, y, y >= 0, softcap, HAS_BIAS, HAS_SOFTCAP)
    loss = (lse - zy) * (1.0 - smoothing)
    if HAS_SMOOTH:
        loss += smoothing * (lse - zsum / V)
    loss += z_loss * lse * lse
    tl.store(Loss + r, loss)
    tl.store(Lse + r, lse)
    tl.store(Arg + r, arg)
    if WRITE_DZ:
        for v0 in tl.range(0, V, BLOCK_V, num_stages=STAGES):
            cols = v0 + offs
            ok = cols < V
            z, t = _row_logits(z_row, Bias, cols, ok, softcap, HAS_BIAS, HAS_SOFTCAP)
            dz = _dlogits(z, t, lse, 1.0, cols == y, smoothing, z_loss, V, HAS_SOFTCAP).to(DZ.dtype.element_ty)
            tl.debug_barrier()  # all warps hold this block (and the target logit) before DZ overwrites Z
            tl.store(dz_row + cols, dz, mask=ok)
            if STORE_BLOCKS:
                rg = (row0 + r).to(tl.int64)
                tl.store(DZT + rg * Vt + cols, dz, mask=ok & (cols < Vt))
                u = tl.maximum(cols - Vt, 0)
                j = u >> vc_log2
                c0 = j << vc_log2
                width = tl.minimum(V - Vt - c0, 1 << vc_log2)
                off = j.to(tl.int64) * N_all * (1 << vc_log2) + rg * width + (u - c0)
                tl.store(DZB + off, dz, mask=ok & (cols >= Vt))


# The eager strategy's gradients (of sum(loss), made in the forward) are scaled by the upstream
# gradient in the backward. ``x.mul_(g)`` with a 16-bit x and an fp32 CUDA g runs PyTorch's
# dynamic-casting elementwise kernel: ~1 TB/s on the H200 (0.75 of 6.3 ms at V = 32000 with
# d weight, masked_ce.jsonl kernel_ms, git c3c84b9), a quarter of the bandwidth. This kernel
# does the same arithmetic (x in fp32 times g, rounded once to x's dtype) in wide vectors.
SCALE_BLOCK = 4096
SCALE_WARPS = 4


@triton.jit
def _scale_kernel(X, G, KEEP, n, cols, PER_ROW: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr):
    """``X *= g`` over ``n`` contiguous elements, rounded once to X's dtype.

    Flat (neither ``PER_ROW`` nor ``HAS_KEEP``): program p scales elements ``[p * BLOCK, ...)``
    by ``G[0]``. Per row (grid ``(rows, cdiv(cols, BLOCK))``, rows of ``cols`` elements):
    program (r, j) scales columns ``[j * BLOCK, ...)`` of row r by ``G[r]`` (``PER_ROW``) or
    ``G[0]``; with ``HAS_KEEP`` a row whose ``KEEP`` byte is 0 is written as zeros without
    being read (it may hold anything, NaN included). The row is the program's, so no
    per-element division finds it."""
    if PER_ROW or HAS_KEEP:
        row = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = c < cols
        offs = row.to(tl.int64) * cols + c
    else:
        row = 0
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
    keep = True
    if HAS_KEEP:
        keep = tl.load(KEEP + row) != 0
    if keep:
        if PER_ROW:
            g = tl.load(G + row)
        else:
            g = tl.load(G)
        x = tl.load(X + offs, mask=ok)
        tl.store(X + offs, (x.to(tl.float32) * g).to(X.dtype.element_ty), mask=ok)
    else:
        tl.store(X + offs, tl.zeros([BLOCK], X.dtype.element_ty), mask=ok)


def scale_(x: torch.Tensor, g: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``x *= g`` in place, rounded once to x's dtype, as ``x.mul_(g)`` computes it: ``x``
    contiguous, ``g`` an fp32 scalar (0-d) or one factor per row of ``x`` (``(x.shape[0],)``).
    ``keep`` (``(x.shape[0],)`` bool or uint8): rows where it is False are set to 0 instead,
    whatever they held (the eager forward leaves the unlabelled rows of hidden's gradient
    unwritten: this pass, which visits every row anyway, zeroes them without reading them).
    Returns ``x``."""
    if x.numel() == 0:
        return x
    if not x.is_contiguous():
        raise ValueError(f"x: expected a contiguous tensor, got strides {tuple(x.stride())}")
    per_row = g.dim() > 0
    if per_row and g.shape != (x.shape[0],):
        raise ValueError(f"g: expected a 0-d tensor or shape ({x.shape[0]},), got {tuple(g.shape)}")
    if keep is not None and (keep.shape != (x.shape[0],) or keep.dtype not in (torch.bool, torch.uint8)):
        raise ValueError(f"keep: expected a bool or uint8 tensor of shape ({x.shape[0]},), "
                         f"got {keep.dtype} {tuple(keep.shape)}")
    g = g.to(torch.float32).contiguous()
    n = x.numel()
    rows = x.shape[0]
    cols = n // rows
    if per_row or keep is not None:
        block = min(SCALE_BLOCK, next_power_of_2(cols))
        grid = (rows, cdiv(cols, block))
    else:
        block = SCALE_BLOCK
        grid = (cdiv(n, block),)
    _scale_kernel[grid](
        x, g, (keep.contiguous().view(torch.uint8) if keep is not None else g), n, cols,
        PER_ROW=per_row, HAS_KEEP=keep is not None, BLOCK=block, num_warps=SCALE_WARPS,
    )
    return x


# Autotune keys leave N out on purpose: the number of labelled rows changes every batch and
# re-tuning each time would cost seconds; the best tile depends on C and V.
_FWD_KEY = ["C", "V", "HAS_BIAS", "HAS_SOFTCAP", "HAS_SMOOTH"]
_BWD_KEY = ["C", "V", "HAS_BIAS", "HAS_SOFTCAP"]
_fwd_tuned = triton.autotune(configs=_triton_configs(FWD_CONFIGS), key=_FWD_KEY)(_mce_fwd_kernel)
_bwd_tuned = triton.autotune(configs=_triton_configs(BWD_CONFIGS), key=_BWD_KEY)(_mce_bwd_kernel)
_fwd_tuned_fp32 = triton.autotune(configs=_triton_configs(FWD_CONFIGS_FP32), key=_FWD_KEY)(_mce_fwd_kernel)
_bwd_tuned_fp32 = triton.autotune(configs=_triton_configs(BWD_CONFIGS_FP32), key=_BWD_KEY)(_mce_bwd_kernel)

# Every configuration the autotuners may launch, for the compile test: (kernel name, dtype, config).
ALL_CONFIGS = (
    [("fwd", "bf16", c) for c in FWD_CONFIGS] + [("bwd", "bf16", c) for c in BWD_CONFIGS]
    + [("fwd", "fp32", c) for c in FWD_CONFIGS_FP32] + [("bwd", "fp32", c) for c in BWD_CONFIGS_FP32]
)


# The tile each autotuned kernel last launched with ("fwd" / "bwd" -> "128x64x64 w8 s4") and
# the eager strategy's last chunking ("eager" -> "5 x 704 rows, in the gradient"), for
# benchmark rows.
LAST_TILES: dict = {}


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Uninitialised buffer for a kernel to fill (tests replace this to poison it with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _choose_splits(N: int, V: int, device) -> tuple[int, int]:
    """(splits, columns per split): enough programs to fill the GPU in near-whole waves.

    Each forward program is long (it walks a whole split), so a last wave that is mostly
    empty costs a lot: pick the smallest split count whose programs fill >= 90% of their
    waves. Row blocks are counted at 128 rows, the tile of the main configs.
    """
    sms = _num_sms(device)
    row_blocks = max(1, cdiv(N, 128))
    max_s = max(1, min(MAX_SPLITS, cdiv(V, SPLIT_ALIGN)))
    best = 1
    for s in range(1, max_s + 1):
        progs = row_blocks * s
        waves = cdiv(progs, sms)
        best = s
        if progs >= sms and progs / (waves * sms) >= 0.9:
            break
    split_cols = cdiv(cdiv(V, best), SPLIT_ALIGN) * SPLIT_ALIGN
    return cdiv(V, split_cols), split_cols


def masked_ce_forward(h, w, b, y, softcap, label_smoothing, z_loss):
    """Per-row loss, lse and correctness of labelled rows.

    h ``(N, C)`` fp16/bf16/fp32 contiguous; w ``(V, C)`` same dtype contiguous; b ``(V,)``
    or None; y ``(N,)`` int32 in ``[0, V)``. Returns ``loss (N,) fp32, lse (N,) fp32,
    correct (N,) bool``. No host synchronisation.
    """
    N, C = h.shape
    V = w.shape[0]
    S, split_cols = _choose_splits(N, V, h.device)
    stats = _alloc((5, S, N), torch.float32, h.device)
    arg = _alloc((S, N), torch.int32, h.device)
    common = dict(
        HAS_BIAS=b is not None, HAS_SOFTCAP=bool(softcap), HAS_SMOOTH=bool(label_smoothing), IEEE=h.dtype == torch.float32,
    )
    args = (h, w, b if b is not None else h, y, stats, arg, N, V, C, h.stride(0), w.stride(0), split_cols, float(softcap or 1.0))
    if h.is_cuda:
        tuned = _fwd_tuned_fp32 if h.dtype == torch.float32 else _fwd_tuned
        grid = lambda meta: (cdiv(N, meta["BLOCK_M"]), S)  # noqa: E731
        c = launch_tuned(tuned, grid, args, dict(EVEN_K=C % 64 == 0, **common))  # every BLOCK_K divides 64
        LAST_TILES["fwd"] = tile_name(c)
    else:
        cfg = INTERPRET_CONFIG
        _mce_fwd_kernel[(cdiv(N, cfg["BLOCK_M"]), S)](
            *args, EVEN_K=C % cfg["BLOCK_K"] == 0, **common, **cfg
        )
    m, s, zy, zsum, best = stats.unbind(0)
    lse = torch.logsumexp(m + torch.log(s), dim=0)
    loss = ref.row_loss(lse, zy.sum(0), zsum.sum(0), V, label_smoothing, z_loss)
    # torch.argmax returns the first maximum: the earliest split wins ties, as in one pass.
    pick = best.argmax(0, keepdim=True)
    correct = arg.gather(0, pick).squeeze(0) == y
    return loss, lse, correct


# What this torch's cuBLAS can do, probed once per (capability, device type, dtype); each
# capability has its own name.
_CAPS: dict = {}


def _probe(what: str, a: torch.Tensor, check) -> bool:
    key = (what, str(a.device), a.dtype)  # per device: a machine may mix GPU models
    if key not in _CAPS:
        try:
            # autocast off: a first call inside torch.autocast would otherwise compare against
            # a 16-bit "fp32" product and cache a capability as missing for the process
            with ref.autocast_off(a.device):
                _CAPS[key] = bool(check())
        except (RuntimeError, TypeError, NotImplementedError):
            _CAPS[key] = False
    return _CAPS[key]


def fp32_logits_available(h: torch.Tensor) -> bool:
    """Whether :func:`_mm_fp32` can run for h's device and dtype: 16-bit inputs on CUDA need
    cuBLAS's fp32-output GEMM (``torch.mm(..., out_dtype=torch.float32)``), probed once."""
    if h.dtype == torch.float32 or not h.is_cuda:
        return True

    def check():
        t = torch.ones(16, 16, device=h.device, dtype=h.dtype)
        return torch.mm(t, t, out_dtype=torch.float32).dtype == torch.float32

    return _probe("mm_fp32", h, check)


def _addmm_into_fp32_ok(a: torch.Tensor) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` accumulates 16-bit
    operands into an fp32 tensor in place on a's device (one cuBLAS GEMM with beta = 1);
    probed once on a small case and checked against fp32 math, so a build without it (or
    getting it wrong) falls back to a product plus an add."""
    def check():
        g = torch.Generator(device=a.device).manual_seed(0)
        x = torch.randn(32, 48, device=a.device, generator=g).to(a.dtype)
        y = torch.randn(48, 16, device=a.device, generator=g).to(a.dtype)
        acc = torch.randn(32, 16, device=a.device, generator=g)
        want = acc + x.float() @ y.float()
        torch.addmm(acc, x, y, out_dtype=torch.float32, out=acc)
        return acc.dtype == torch.float32 and torch.allclose(acc, want, rtol=1e-4, atol=1e-3)

    return _probe("addmm_into_fp32", a, check)


def _mm_out_fp32_ok(a: torch.Tensor) -> bool:
    """Whether :func:`_mm_fp32` can write into a given fp32 tensor (``out=``) on a's device and
    dtype: fp32 and CPU operands always; 16-bit CUDA operands need ``aten::mm.dtype_out``,
    probed once and checked against fp32 math."""
    if a.dtype == torch.float32 or not a.is_cuda:
        return True

    def check():
        g = torch.Generator(device=a.device).manual_seed(0)
        x = torch.randn(32, 48, device=a.device, generator=g).to(a.dtype)
        y = torch.randn(48, 16, device=a.device, generator=g).to(a.dtype)
        out = torch.empty(32, 16, device=a.device)
        torch.mm(x, y, out_dtype=torch.float32, out=out)
        return torch.allclose(out, x.float() @ y.float(), rtol=1e-4, atol=1e-3)

    return _probe("mm_out_fp32", a, check)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``a @ b`` with fp32 accumulation: cuBLAS's ``out_dtype`` for 16-bit inputs on CUDA
    (see :func:`fp32_logits_available`), fp32 operands elsewhere (the interpreter tests' CPU
    path). ``out``: an fp32 tensor to write into (see :func:`_mm_out_fp32_ok`)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out) if out is not None else a @ b
    if a.is_cuda:
        if out is not None:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float(), out=out) if out is not None else a.float() @ b.float()


def _logits_fp32(hc: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The eager strategy's logits GEMM: fp32 ``hc @ w.T`` (:func:`_mm_fp32`), into ``out`` if given."""
    return _mm_fp32(hc, w.t(), out)


def _mm_into_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with the product in fp32: in place in one GEMM where cuBLAS takes
    16-bit operands into an fp32 C (``addmm(out_dtype=)``), else through an fp32 product
    (an extra ``acc``-sized temporary and pass), else a 16-bit product upcast."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _addmm_into_fp32_ok(a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif fp32_logits_available(a):
        acc += _mm_fp32(a, b)
    else:
        acc += torch.mm(a, b).float()


def bwd_vocab_chunk(N: int, V: int) -> int:
    """Columns per launch of the two-pass backward: ``N * Vc <= max(MAX_CHUNK_ELEMS, N * 256)``."""
    vc = max(SPLIT_ALIGN, (MAX_CHUNK_ELEMS // max(N, 1)) // SPLIT_ALIGN * SPLIT_ALIGN)
    return min(vc, cdiv(V, SPLIT_ALIGN) * SPLIT_ALIGN)


def _aligned(elems: int, itemsize: int) -> int:
    """``elems`` rounded up to a 16-byte boundary."""
    per = 16 // itemsize
    return cdiv(elems, per) * per


def two_pass_plan(N: int, V: int, n_rows: int, C: int, itemsize: int, need_h: bool) -> int:
    """Columns per launch of a two-pass backward that works inside hidden's gradient buffer
    (``IN_GRAD``), 0 where it does not fit: the unlabelled rows' room must hold the gathered
    rows (``N x C``), the fp32 d-hidden accumulator and a dZ buffer of at least
    ``SPLIT_ALIGN`` columns; the dZ buffer takes what room is left, up to
    :func:`bwd_vocab_chunk`."""
    if not (IN_GRAD and need_h):
        return 0
    free = (n_rows - _scratch_row0(N)) * C * itemsize - 48  # three 16-byte alignments
    left = free - N * C * (itemsize + 4)
    vc = (left // (N * itemsize)) // SPLIT_ALIGN * SPLIT_ALIGN if left > 0 else 0
    return min(vc, bwd_vocab_chunk(N, V)) if vc >= SPLIT_ALIGN else 0


def masked_ce_backward(h, w, b, y, lse, g, softcap, label_smoothing, z_loss, need_h, need_w, need_b,
                       scratch=None, vc=None, dh_out=None):
    """Gradients of ``sum(g * loss)`` w.r.t. h ``(N, C)``, w ``(V, C)`` and b ``(V,)``.

    g ``(N,)`` fp32 per-row upstream gradient; lse ``(N,)`` fp32 from the forward. Returns
    ``dh, dw, db`` in the inputs' dtypes (None where not needed). Memory beyond the
    outputs: a ``(N, Vc)`` dZ buffer (``Vc``: ``vc``, default :func:`bwd_vocab_chunk`) and
    an fp32 ``(N, C)`` accumulator, both carved from ``scratch`` (a 16-byte aligned flat
    tensor of h's dtype, see :func:`two_pass_plan`) when given; ``dh`` is then written into
    ``dh_out`` ``(N, C)``. No host synchronisation.
    """
    N, C = h.shape
    V = w.shape[0]
    dev = h.device
    vc = vc or bwd_vocab_chunk(N, V)
    if scratch is not None:
        acc_end = _aligned(N * C * 4 // h.element_size(), h.element_size())
        dh = scratch[: N * C * 4 // h.element_size()].view(torch.float32).view(N, C).zero_() if need_h else None
        dz_buf = scratch[acc_end: acc_end + N * vc].view(N, vc)
    else:
        dz_buf = _alloc((N, vc), h.dtype, dev)
        dh = torch.zeros((N, C), device=dev, dtype=torch.float32) if need_h else None
    dw = _alloc((V, C), w.dtype, dev) if need_w else None
    db = _alloc((V,), torch.float32, dev) if need_b else None
    common = dict(HAS_BIAS=b is not None, HAS_SOFTCAP=bool(softcap), IEEE=h.dtype == torch.float32)
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        width = v1 - v0
        dz = dz_buf[:, :width]
        args = (
            h, w, b if b is not None else h, y, lse, g, dz, N, V, C, v0, v1, h.stride(0), w.stride(0), dz_buf.stride(0),
            float(softcap or 1.0), float(label_smoothing), float(z_loss),
        )
        if h.is_cuda:
            tuned = _bwd_tuned_fp32 if h.dtype == torch.float32 else _bwd_tuned
            grid = lambda meta: (cdiv(N, meta["BLOCK_M"]), cdiv(width, meta["BLOCK_N"]))  # noqa: E731
            c = launch_tuned(tuned, grid, args, dict(EVEN_K=C % 64 == 0, **common))
            LAST_TILES["bwd"] = tile_name(c)
        else:
            cfg = INTERPRET_CONFIG
            _mce_bwd_kernel[(cdiv(N, cfg["BLOCK_M"]), cdiv(width, cfg["BLOCK_N"]))](
                *args, EVEN_K=C % cfg["BLOCK_K"] == 0, **common, **cfg
            )
        if need_h:
            _mm_into_fp32(dh, dz, w[v0:v1])
        if need_w:
            torch.mm(dz.t(), h, out=dw[v0:v1])
        if need_b:
            db[v0:v1] = dz.sum(0, dtype=torch.float32)
    if need_h:
        dh = dh_out.copy_(dh) if dh_out is not None else dh.to(h.dtype)
    return dh, dw, (db.to(b.dtype) if need_b else None)


# The eager strategy holds one (rows, V) fp32 logits chunk of at most this many elements
# (64 MB): the same budget as the two-pass backward's dZ buffer plus its fp32 dH accumulator.
EAGER_CHUNK_ELEMS = 1 << 24
# With d weight, each row chunk after the first re-reads and re-writes all of dW (V x C, in
# the weight's dtype: one more rounding in 16 bits). "auto" takes eager with d weight when
# the rows fit in one chunk, or when a chunk holds at least EAGER_MIN_W_ROWS rows (the saved
# GEMM, 2 x rows x C x V FLOPs, then outweighs the chunk's 4 x V x C bytes of dW traffic:
# rows > 2 x FLOP rate / bandwidth, ~250 on an H200) and there are at most
# EAGER_MAX_W_CHUNKS chunks (bounds dW's roundings). Measured on an H200 (bf16, C = 4096,
# 3277 labelled rows, benchmarks/results/masked_ce.jsonl, git 71fe4ae): V = 32000 (524 rows
# per chunk, 7 chunks) eager 6.1 ms vs two-pass 8.3; V = 128256 (130 rows, 26 chunks) 40.8
# vs 29.0. d weight within the STYLE.md rule at 7 chunks (test_masked_ce_gpu.py).
EAGER_MIN_W_ROWS = 256
EAGER_MAX_W_CHUNKS = 8
# Whether "auto" may pick the eager strategy. On since the H200 run above: eager passed
# test_masked_ce_gpu.py (bf16 / fp16 / fp32, the acceptance shape, no host sync) and was
# faster wherever the rule above takes it (frozen head: 3.9 vs 7.0 ms at V = 32000, 18.0 vs
# 24.6 at V = 128256).
EAGER_AUTO = True


# The row kernel streams its row twice, 16 fp32 per thread per block. Its block loops are
# software-pipelined (``tl.range(num_stages=ROWS_STAGES)``: the next block's loads are issued,
# as cp.async into shared memory, while this block is reduced), so two blocks per program are
# in flight instead of one: at V >= 128k a chunk has about one row per SM and the H200 run
# (git c3c84b9) streamed ~2.3 TB/s there (1.9-2.2 ms for ~5 GB at V = 151936), half the
# chip's bandwidth. Safe with dz written over the row: block j's 16-bit stores land in fp32
# columns below (j + 1) * BLOCK_V / 2, never in a block still to be loaded. 32 KB of shared
# memory per stage at BLOCK_V 8192. Untimed on a GPU (its ``kernel_ms`` against those rows
# will say); the compile test checks the cp.async and that nothing spills.
ROWS_STAGES = 2
# Set when a launch with ROWS_STAGES failed to build (another Triton's pipeliner): every later
# launch runs the plain loop (see _row_stats).
_ROWS_PIPELINE_FAILED = False
# From this vocabulary up, a chunk holds at most EAGER_CHUNK_ELEMS // V <= 256 rows, so the
# row kernel (one program per row) has about one program per SM: it runs 16 warps over
# 8192-column blocks, twice the bytes in flight per SM of 8 warps over 4096 (16 fp32 per
# thread either way; a memory-bound stream with one CTA per SM is latency-bound). Untimed on
# a GPU; the compile test compiles both shapes (spill-free).
ROWS_WIDE_V = 65536


def _rows_block(V: int, on_cuda: bool) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernel: 16 fp32 per thread on a GPU, one block for small V."""
    if on_cuda and V >= ROWS_WIDE_V:
        return 8192, 16
    bv = min(4096 if on_cuda else 1024, next_power_of_2(max(V, 16)))
    return bv, (8 if bv >= 2048 else 4)


def eager_row_chunk(V: int) -> int:
    """Most rows per chunk of the eager strategy (its fp32 logits chunk holds <= EAGER_CHUNK_ELEMS)."""
    return max(1, EAGER_CHUNK_ELEMS // max(V, 1))


# Chunk rows are the M of the chunk's three GEMMs: a multiple of the tensor-core row tile
# leaves no nearly empty last tile (V = 128256 allows 130 rows: two 64- or 128-row tiles,
# the second almost empty, for every chunk).
EAGER_ROW_ALIGN = 64


def _even_rows(N: int, r_max: int) -> int:
    """Rows per chunk for ``N`` rows and at most ``r_max`` per chunk: all of them when they
    fit, else the fewest chunks ``r_max`` allows with their rows evened out and rounded up to
    ``EAGER_ROW_ALIGN`` (rounded down instead where that would pass ``r_max``); ``r_max``
    itself where it is below the alignment."""
    r_max = max(r_max, 1)
    if N <= r_max:
        return max(N, 1)
    if r_max < EAGER_ROW_ALIGN:
        return r_max
    even = cdiv(cdiv(N, cdiv(N, r_max)), EAGER_ROW_ALIGN) * EAGER_ROW_ALIGN
    return even if even <= r_max else r_max // EAGER_ROW_ALIGN * EAGER_ROW_ALIGN


def eager_rows(N: int, V: int) -> int:
    """Rows per chunk for ``N`` rows when the logits chunk is a buffer of its own (at most
    ``EAGER_CHUNK_ELEMS`` fp32): see :func:`_even_rows`."""
    return _even_rows(N, eager_row_chunk(V))


# The eager forward's gradient of hidden (all its rows, only the labelled ones nonzero) is
# built in the forward, straight in the buffer the backward hands to autograd, and each
# chunk's fp32 logits and gathered rows live in that buffer's unlabelled part until the
# labelled rows' gradients are put in place: the op then allocates nothing beyond the
# gradients themselves (the buffer the backward must return anyway, and d weight) but
# vectors of N. With buffers of its own the peak was the
# gradients + N x C (the labelled rows' gradient kept from forward to backward, beside the
# full one: 26 MiB at C = 4096, 16k tokens, 20% labelled; the 64 MiB logits chunk lived in
# the forward only), or the forward's chunk where that is larger than hidden's gradient
# (few tokens), against cut-cross-entropy's gradient-only footprint. Used when d hidden is
# wanted and the unlabelled rows hold a chunk of at least min(N, the separate buffer's
# chunk, EAGER_SCRATCH_MIN_ROWS) rows; the chunk then takes all the room there is (704 rows in 5
# chunks instead of 512 in 7 at V = 32000, 192 instead of 128 at V = 128256, 128 instead of
# 64 at V = 151936 for that shape: fewer passes over the weight, whose reads bound the
# small-M GEMMs). EAGER_SCRATCH_MIN_ROWS: below ~250 rows a chunk's GEMMs read the weight
# faster than they use it (2 x rows FLOP per weight byte against ~190 FLOP/B of an H200's
# bf16 rate over its bandwidth, ~240 on an H100), so a smaller in-place chunk is not taken
# over a larger separate one.
IN_GRAD = True
EAGER_SCRATCH_MIN_ROWS = 256
# The labelled rows' gradients sit in rows [0, N) of the buffer; the chunks start at row N
# rounded up to this (even fp32 offsets, 16-byte alignment for cuBLAS at any C).
SCRATCH_ROW_ALIGN = 16
# The copied-block fallback of the row move (``_place_rows`` with a block size, or rows that
# are not contiguous) copies blocks of at most this many bytes.
PLACE_BLOCK_BYTES = 1 << 20


def _scratch_row0(N: int) -> int:
    return cdiv(N, SCRATCH_ROW_ALIGN) * SCRATCH_ROW_ALIGN


def _grad_with_room(flat_h: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden's gradient buffer (uninitialised, ``flat_h``'s shape and dtype) and its room:
    the flat elements from row ``_scratch_row0(N)`` on, 16-byte aligned, free until the
    labelled rows' gradients (rows ``[0, N)``) are moved into place (:func:`_place_rows`)."""
    grad = _alloc(tuple(flat_h.shape), flat_h.dtype, flat_h.device)
    return grad, grad.view(-1)[_scratch_row0(N) * flat_h.shape[1]:]


def _scratch_rows(N: int, V: int, n_rows: int, row_bytes: int) -> int:
    """How many rows of a chunk (fp32 logits of width V and a gathered row of ``row_bytes``,
    16-byte aligned) fit in rows ``[_scratch_row0(N), n_rows)`` of a buffer whose rows take
    ``row_bytes`` each."""
    free = max(0, n_rows - _scratch_row0(N)) * row_bytes - 16
    return max(0, free) // (4 * max(V, 1) + row_bytes)


def eager_plan(N: int, V: int, n_rows: int, row_bytes: int, need_h: bool, in_grad_ok: bool = True) -> tuple[int, bool]:
    """``(rows per chunk, in_grad)`` of the eager strategy for ``N`` labelled rows of a hidden
    with ``n_rows`` rows of ``row_bytes`` bytes: ``in_grad`` when the logits chunks live in
    hidden's gradient buffer (``IN_GRAD``, see above; needs d hidden and, from
    ``in_grad_ok``, a GEMM that writes fp32 into a given tensor), else a separate buffer of
    ``EAGER_CHUNK_ELEMS`` (:func:`eager_rows`)."""
    own = eager_rows(N, V)
    if IN_GRAD and need_h and in_grad_ok:
        room = _scratch_rows(N, V, n_rows, row_bytes)
        if room >= min(N, own, EAGER_SCRATCH_MIN_ROWS):
            return _even_rows(N, room), True
    return own, False


def _grad_fit(r0: int, V: int, n_rows: int, row_bytes: int) -> int:
    """Most rows ``R`` of an in-gradient eager chunk starting at labelled row ``r0`` whose fp32
    logits and gathered rows fit past its own gradient rows: from row ``_scratch_row0(r0 + R)``
    (at most ``r0 + R + 15``) to ``n_rows``, less 16 bytes of alignment."""
    return max(0, ((n_rows - r0 - 16) * row_bytes - 16) // (4 * max(V, 1) + 2 * row_bytes))


def grad_chunk_ends(N: int, V: int, n_rows: int, row_bytes: int, base: int) -> list[int]:
    """Chunk ends of the eager strategy inside hidden's gradient (``eager_plan``'s in-grad
    case, ``base`` its rows per chunk). A chunk's logits and gathered rows only need to avoid
    the gradient rows written so far, so chunk ``[r0, r1)`` may use every row from ``r1`` on,
    not only those past all ``N`` labelled rows: early chunks have more room. Greedy: each
    chunk takes what fits (a multiple of ``EAGER_ROW_ALIGN``, at least ``base``, all the rest
    when it fits); then, if the same number of chunks evened out (as :func:`_even_rows` does)
    fits everywhere, those. At C = 4096, bf16, 16k tokens, 3262 labelled rows, V = 151936:
    10 chunks of 192 and 11 smaller instead of 26 of 128 (each chunk's two GEMMs read all of
    the weight: at 128 rows they are bound by those reads)."""
    ends, r0 = [], 0
    while r0 < N:
        fit = _grad_fit(r0, V, n_rows, row_bytes)
        take = N - r0 if fit >= N - r0 else max(base, fit // EAGER_ROW_ALIGN * EAGER_ROW_ALIGN)
        r0 = min(N, r0 + take)
        ends.append(r0)
    k = len(ends)
    even = cdiv(cdiv(N, k), EAGER_ROW_ALIGN) * EAGER_ROW_ALIGN
    if k > 1 and all(_grad_fit(i * even, V, n_rows, row_bytes) >= min(even, N - i * even) for i in range(k)):
        return [min(N, (i + 1) * even) for i in range(k)]
    return ends


def choose_strategy(strategy: str, N: int, V: int, need_wb: bool, uniform_g: bool, fp32_logits: bool = True,
                    rows: int | None = None, stored: bool = False) -> str:
    """``"eager"`` or ``"two_pass"`` for a call that needs gradients.

    Where the reference allows eager (``reference.eager_allowed``) and ``EAGER_AUTO`` is on,
    ``"auto"`` takes it when only d hidden is wanted (a frozen LM head: two GEMMs instead of
    three), and with d weight (three GEMMs instead of four) when the rows fit in one chunk or
    in at most ``EAGER_MAX_W_CHUNKS`` chunks of at least ``EAGER_MIN_W_ROWS`` rows each;
    with ``EAGER_AUTO`` off ``"auto"`` is two-pass. ``stored`` (:func:`stored_plan` applies:
    d weight made once from stored dz, no per-chunk dW traffic): eager with d weight at any
    number of chunks.
    ``fp32_logits`` False (no fp32-output GEMM, see :func:`fp32_logits_available`): auto
    stays two-pass and ``strategy="eager"`` raises ``ValueError``. ``rows``: eager's rows per
    chunk (:func:`eager_plan`; default :func:`eager_rows`).
    """
    if not ref.eager_allowed(strategy, need_wb, uniform_g) or (strategy == "auto" and not EAGER_AUTO):
        return "two_pass"
    if not fp32_logits:
        if strategy == "eager":
            raise ValueError("strategy: 'eager' needs torch.mm(..., out_dtype=torch.float32) for 16-bit CUDA "
                             "inputs, which this torch lacks; use 'two_pass' or 'auto'")
        return "two_pass"
    if strategy == "eager" or not need_wb or stored:
        return "eager"
    rows = rows or eager_rows(N, V)
    chunks = cdiv(N, rows)
    return "eager" if chunks == 1 or (rows >= EAGER_MIN_W_ROWS and chunks <= EAGER_MAX_W_CHUNKS) else "two_pass"


def _row_stats(z, b, y, loss, lse, arg, r0, softcap, label_smoothing, z_loss, dz=None, blocks=None):
    """``_mce_rows_kernel`` over the fp32 logits chunk ``z`` (rows ``r0 ...`` of the labelled
    rows): their loss, lse and argmax into ``loss`` / ``lse`` / ``arg`` at ``r0``, and with
    ``dz`` (which may alias ``z``'s storage) their d logits; ``blocks`` ``(dzt, dzb, vt,
    vc)``: dz also into the stored strategy's blocked layout (see the kernel)."""
    global _ROWS_PIPELINE_FAILED
    R, V = z.shape
    bv, warps = _rows_block(V, z.is_cuda)
    dzt, dzb, vt, vc = blocks if blocks is not None else (z, z, 0, 1)

    def launch(stages):
        _mce_rows_kernel[(R,)](
            z, b if b is not None else z, y[r0:r0 + R], z if dz is None else dz, loss[r0:r0 + R], lse[r0:r0 + R],
            arg[r0:r0 + R], dzt, dzb, V, z.stride(0), z.stride(0) if dz is None else dz.stride(0),
            float(softcap or 1.0), float(label_smoothing), float(z_loss), y.shape[0], r0, vt, vc.bit_length() - 1,
            HAS_BIAS=b is not None, HAS_SOFTCAP=bool(softcap), HAS_SMOOTH=bool(label_smoothing), BLOCK_V=bv,
            WRITE_DZ=dz is not None, STORE_BLOCKS=blocks is not None, STAGES=stages, num_warps=warps,
        )

    if ROWS_STAGES < 2 or _ROWS_PIPELINE_FAILED:
        launch(1)
        return
    try:
        launch(ROWS_STAGES)
    except Exception as e:  # noqa: BLE001 - a Triton build whose pipeliner rejects the loop
        # Compiled here for sm_90 / sm_80 with this checkout's Triton; another Triton may
        # refuse the pipelined loop. One warning, then the plain loop (same results).
        _ROWS_PIPELINE_FAILED = True
        warnings.warn(f"masked CE row kernel: the pipelined loop failed to build ({type(e).__name__}: "
                      f"{str(e)[:200]}); running it unpipelined", RuntimeWarning, stacklevel=2)
        launch(1)


def masked_ce_eager(flat_h, h_index, w, b, y, softcap, label_smoothing, z_loss, need_h, need_w, need_b, plan=None):
    """Loss, lse, correctness and the gradients of ``sum(loss)``, in one pass over the logits.

    ``flat_h`` ``(n_rows, C)`` every row of hidden, ``h_index`` ``(N,)`` the labelled ones
    (strictly increasing, as ``reference.labelled_rows`` makes them). Per chunk of ``R`` rows
    (:func:`eager_plan`; in hidden's gradient, :func:`grad_chunk_ends`): the chunk's rows
    are gathered (``R x C``), ``Z = h_c @ w.T`` on cuBLAS into an fp32 ``(R, V)`` buffer,
    ``_mce_rows_kernel`` turns each row into its statistics and writes dz (input dtype) over
    the buffer, then ``dH_c = dz @ w`` (rows of dH
    are disjoint: written once, in the input dtype), ``dW += dz.T @ h_c`` and
    ``db += sum(dz)``. Three GEMMs of ``N x C x V`` with d weight (two without) instead of the
    two-pass strategy's four (three).

    Returns ``loss, lse, correct, dh, dw, db, in_grad`` (None where not needed). ``in_grad``
    True: ``dh`` is hidden's whole gradient ``(n_rows, C)``, built in place: the labelled
    rows' gradients fill its first ``N`` rows while each chunk's logits and gathered rows use
    the rows past that chunk's own, then :func:`_place_rows` moves them to ``h_index``; the
    other rows hold leftovers until the backward's :func:`scale_` writes them as zeros.
    False: ``dh`` is ``(N, C)``, the labelled rows' gradients only, and the logits chunk a
    buffer of its own. ``dw`` accumulates in the weight's dtype across the ``cdiv(N, R)``
    chunks (one rounding per chunk).
    """
    N = h_index.shape[0]
    n_rows, C = flat_h.shape
    dt = flat_h.dtype
    V = w.shape[0]
    dev = flat_h.device
    if plan is None:
        plan = plan_eager(N, V, C, n_rows, flat_h.element_size(), need_h, need_w, _mm_out_fp32_ok(flat_h))
    if need_w and plan.stored is not None:
        return masked_ce_eager_stored(flat_h, h_index, w, b, y, softcap, label_smoothing, z_loss, need_b, plan.stored)
    _, ends, in_grad, _ = plan
    sizes = sorted({e - s for s, e in zip([0] + ends[:-1], ends)}, reverse=True)
    LAST_TILES["eager"] = (f"{len(ends)} x {'/'.join(map(str, sizes[:3]))} rows, "
                           f"{'in the gradient' if in_grad else 'own buffer'}")
    loss = _alloc((N,), torch.float32, dev)
    lse = _alloc((N,), torch.float32, dev)
    arg = _alloc((N,), torch.int32, dev)
    if in_grad:
        dh = _alloc(tuple(flat_h.shape), dt, dev)
        flat_dh = dh.view(-1)
    else:
        dh = _alloc((N, C), dt, dev) if need_h else None
    dw = _alloc((V, C), w.dtype, dev) if need_w else None
    db = torch.zeros((V,), device=dev, dtype=torch.float32) if need_b else None
    for r0, r1 in zip([0] + ends[:-1], ends):
        if in_grad:
            # this chunk's logits and rows: past its own gradient rows (grad_chunk_ends)
            z0 = _scratch_row0(r1) * C
            z_end = z0 + (r1 - r0) * V * (4 // dh.element_size())  # dt elements of the fp32 logits
            h0 = _aligned(z_end, dh.element_size())
            hc = torch.index_select(flat_h, 0, h_index[r0:r1], out=flat_dh[h0: h0 + (r1 - r0) * C].view(r1 - r0, C))
            z = _logits_fp32(hc, w, flat_dh[z0:z_end].view(torch.float32).view(r1 - r0, V))
        else:
            hc = flat_h.index_select(0, h_index[r0:r1])
            z = _logits_fp32(hc, w)
        # dz over z's own storage: the same positions in fp32, the first half of each row in 16 bits
        dz = z if dt == torch.float32 else z.view(dt)[:, :V]
        _row_stats(z, b, y, loss, lse, arg, r0, softcap, label_smoothing, z_loss, dz=dz)
        if need_h:
            torch.mm(dz, w, out=dh[r0:r1])
        if need_w:
            if r0 == 0:
                torch.mm(dz.t(), hc, out=dw)
            else:
                dw.addmm_(dz.t(), hc)
        if need_b:
            db += dz.sum(0, dtype=torch.float32)
        z = dz = hc = None  # freed before the next chunk's: one chunk alive at a time
    if in_grad:
        _place_rows(dh, h_index, zero=False)  # the backward's scaling zeroes the other rows
    return loss, lse, arg == y, dh, dw, (db.to(b.dtype) if need_b else None), in_grad


# The stored eager strategy (d weight wanted; ``EAGER_STORED``). The chunked eager strategy
# above adds each row chunk's ``dz.T @ h_c`` into dW: every chunk after the first re-reads and
# re-writes all of dW, and its chunks are small where V is large (the fp32 logits of a chunk
# must fit in hidden's unlabelled rows: 128-192 rows at V = 128k-152k), so on the H200 (git
# c3c84b9, C = 4096, 16k tokens, 20% labelled) those dW updates took 13.8 of 31.3 ms at
# V = 128256 and 24.5 of 48.2 at V = 151936, and "auto" chose the two-pass strategy there
# (4 GEMMs, two of them Triton tiles at 340-440 TFLOP/s: 28.4 and 34.8 ms).
# Stored instead keeps every labelled row's dz (input dtype, N x V) until the row loop ends,
# in d weight's own buffer (V x C: it holds N x V when N <= C), and then makes dW once per
# vocabulary block with one large cuBLAS GEMM each (dZ_j.T @ H, K = N): three GEMMs in all,
# dW written once and rounded once, nothing allocated beyond the gradients. The layout:
#   * hidden's gradient room (rows past the labelled ones, as in eager): the gathered rows
#     H (N x C), then the dz of columns [0, Vt) as an (N, Vt) matrix ("T");
#   * d weight's buffer: the dz of column block j (columns Vt + j Vc on, Vc a power of two,
#     the last block narrower) as an (N, width_j) matrix at element j N Vc; past them, the
#     free tail holds the fp32 logits chunk (or the room does, whichever holds more rows).
# dW is then made block by block, last first, and T's columns last of all. Block j writes dW
# rows [Vt + j Vc, ...), elements from (Vt + j Vc) C on, while the blocks still to be read
# (0 ... j) end at (j + 1) N Vc: no block is overwritten before it is read when
# Vt C >= N Vc and N <= C (the inequality for j = 0, and each later j adds Vc (C - N) >= 0
# to its slack). Hence Vt = ceil(N Vc / C) (rounded up to 8 columns): the first block's dW
# rows land on T's columns' rows, which is why T lives in hidden's room.
EAGER_STORED = True
# Columns per dW block (a power of two; halved down to STORED_MIN_VC while T does not fit):
# at 4096, Vt ~ 0.8 x 4096 for N ~ 0.8 C, T ~ 21 MB and 31-37 dW GEMMs of 4096 x C x N at
# V = 128k-152k.
STORED_VC = 4096
STORED_MIN_VC = 256
# Most rows per logits chunk (the GEMMs' M; more rows than this buy no efficiency).
STORED_MAX_ROWS = 4096


def _stored_offsets(N: int, C: int, V: int, vt: int, itemsize: int) -> tuple[int, int, int]:
    """Where the stored layout's pieces end, in input-dtype elements: the gathered rows H and
    T in hidden's room (``h_end``, ``t_end``), the dW blocks in d weight's buffer (``d_end``)."""
    h_end = _aligned(N * C, itemsize)
    return h_end, h_end + _aligned(N * vt, itemsize), _aligned(N * (V - vt), itemsize)


class StoredPlan(NamedTuple):
    rows: int  # rows per logits chunk
    vt: int  # columns whose dz live in hidden's room ("T")
    vc: int  # columns per block in d weight's buffer (a power of two)
    z_in_w: bool  # the fp32 logits chunk in d weight's free tail (else in hidden's room)


def stored_plan(N: int, V: int, C: int, n_rows: int, itemsize: int, need_h: bool,
                in_grad_ok: bool = True) -> StoredPlan | None:
    """The stored eager strategy's layout for ``N`` labelled rows of a hidden ``(n_rows, C)``
    in a dtype of ``itemsize`` bytes (see the comment above), or None where it does not
    apply: ``EAGER_STORED`` off, d hidden not wanted (its buffer is the room), no
    fp32-output GEMM into a given tensor (``in_grad_ok``), ``N > C``, or a room too small
    for H, T and a logits chunk of ``min(N, EAGER_SCRATCH_MIN_ROWS)`` rows."""
    if not (EAGER_STORED and IN_GRAD and need_h and in_grad_ok) or not 0 < N <= C:
        return None
    room = (n_rows - _scratch_row0(N)) * C  # elements of the input dtype
    per_z = (4 // itemsize) * V  # input-dtype elements of one fp32 logits row
    vc = STORED_VC
    while vc >= STORED_MIN_VC:
        vt = min(V, cdiv(cdiv(N * vc, C), 8) * 8)
        _, t_end, d_end = _stored_offsets(N, C, V, vt, itemsize)
        if t_end <= room:
            r_w = max(0, V * C - d_end) // per_z
            r_h = (room - t_end) // per_z
            r_max = min(max(r_w, r_h), STORED_MAX_ROWS)
            if r_max >= min(N, EAGER_SCRATCH_MIN_ROWS):
                return StoredPlan(_even_rows(N, r_max), vt, vc, r_w >= r_h)
        vc //= 2
    return None


class EagerChunks(NamedTuple):
    """How one eager call runs (:func:`plan_eager`)."""

    rows: int  # the chunked form's rows per chunk (:func:`eager_plan`)
    ends: list  # its chunk ends (grown in hidden's gradient, :func:`grad_chunk_ends`)
    in_grad: bool  # its chunks live in hidden's gradient
    stored: StoredPlan | None  # d weight made from stored dz instead (:func:`eager_stored_plan`)


def plan_eager(N: int, V: int, C: int, n_rows: int, itemsize: int, need_h: bool, need_w: bool,
               in_grad_ok: bool = True) -> EagerChunks:
    """The whole eager plan of a call, made once on the host: the chunked form's chunks and,
    with d weight, the stored layout where :func:`stored_plan` applies and the chunked form
    would take more than one row chunk (in one chunk it makes dW with one GEMM already,
    without stored's blocked dz copy)."""
    row_bytes = C * itemsize
    R, in_grad = eager_plan(N, V, n_rows, row_bytes, need_h, in_grad_ok)
    ends = grad_chunk_ends(N, V, n_rows, row_bytes, R) if in_grad else list(range(R, N, R)) + [N]
    stored = stored_plan(N, V, C, n_rows, itemsize, need_h, in_grad_ok) if need_w and len(ends) > 1 else None
    return EagerChunks(R, ends, in_grad, stored)


def eager_stored_plan(N: int, V: int, C: int, n_rows: int, itemsize: int, need_h: bool,
                      in_grad_ok: bool = True) -> StoredPlan | None:
    """The stored plan eager runs with d weight, or None where it runs chunked (:func:`plan_eager`)."""
    return plan_eager(N, V, C, n_rows, itemsize, need_h, True, in_grad_ok).stored


def masked_ce_eager_stored(flat_h, h_index, w, b, y, softcap, label_smoothing, z_loss, need_b, plan: StoredPlan):
    """The eager contract (:func:`masked_ce_eager`, ``in_grad`` True, d weight made) with
    every dz stored and dW made once at the end (:func:`stored_plan`). Per chunk of rows:
    the fp32 logits on cuBLAS, ``_mce_rows_kernel`` (statistics; dz over the logits for
    ``dH_c = dz @ w``, and into the blocked store). Then per vocabulary block, last first:
    ``dW_j = dZ_j.T @ H`` (and ``db_j``, column sums of dZ_j), T's block last."""
    N = h_index.shape[0]
    n_rows, C = flat_h.shape
    dt = flat_h.dtype
    V = w.shape[0]
    dev = flat_h.device
    R, vt, vc, z_in_w = plan
    LAST_TILES["eager"] = (f"stored: {cdiv(N, R)} x {R} rows, logits in "
                           f"{'d weight' if z_in_w else 'the gradient'}, Vt {vt}, Vc {vc}")
    loss = _alloc((N,), torch.float32, dev)
    lse = _alloc((N,), torch.float32, dev)
    arg = _alloc((N,), torch.int32, dev)
    dh, room = _grad_with_room(flat_h, N)
    dw = _alloc((V, C), w.dtype, dev)
    flat_w = dw.view(-1)
    h_all = torch.index_select(flat_h, 0, h_index, out=room[: N * C].view(N, C))
    h_end, t_end, d_end = _stored_offsets(N, C, V, vt, dh.element_size())
    dzt = room[h_end: h_end + N * vt]
    z_elems = R * V * (4 // dh.element_size())
    z_room = (flat_w[d_end: d_end + z_elems] if z_in_w else room[t_end: t_end + z_elems]).view(torch.float32)
    blocks = (dzt, flat_w, vt, vc)
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        z = _logits_fp32(h_all[r0:r1], w, z_room[: (r1 - r0) * V].view(r1 - r0, V))
        dz = z if dt == torch.float32 else z.view(dt)[:, :V]
        _row_stats(z, b, y, loss, lse, arg, r0, softcap, label_smoothing, z_loss, dz=dz, blocks=blocks)
        torch.mm(dz, w, out=dh[r0:r1])
        z = dz = None
    db = _alloc((V,), torch.float32, dev) if need_b else None
    for j in range(cdiv(V - vt, vc) - 1, -1, -1):
        c0 = vt + j * vc
        width = min(vc, V - c0)
        dz_j = flat_w[j * N * vc: j * N * vc + N * width].view(N, width)
        if need_b:
            db[c0:c0 + width] = dz_j.sum(0, dtype=torch.float32)
        torch.mm(dz_j.t(), h_all, out=dw[c0:c0 + width])
    if vt:
        dz_t = dzt.view(N, vt)
        if need_b:
            db[:vt] = dz_t.sum(0, dtype=torch.float32)
        torch.mm(dz_t.t(), h_all, out=dw[:vt])
    del h_all, dzt, room
    _place_rows(dh, h_index, zero=False)  # the backward's scaling zeroes the other rows
    return loss, lse, arg == y, dh, dw, (db.to(b.dtype) if need_b else None), True


# The two-pass strategy's forward when d weight is wanted (``GEMM_FORWARD``): cuBLAS makes
# the fp32 logits of a chunk of rows over the whole vocabulary and the row kernel reduces
# them to loss, lse and argmax (no dz), instead of the Triton forward kernel. On the H200 (git
# c3c84b9, masked_ce.jsonl kernel_ms, bf16, C = 4096, 3331 rows) the Triton forward ran
# 350-390 TFLOP/s (11.8 ms at V = 151936, 9.0 at 128256) where cuBLAS's logits GEMMs of the
# eager strategy ran ~590 on 128-192-row chunks; the chunks here are larger (below), so the
# GEMMs run nearer the chip's rate and re-read the weight less. Untimed on a GPU as a whole:
# the benchmark's ``strategy-two_pass-triton-fwd`` provider times the Triton forward beside it.
GEMM_FORWARD = True


def gemm_forward_rows(N: int, V: int, C: int, itemsize: int) -> int:
    """Rows per chunk of the GEMM forward: a chunk's fp32 logits and gathered rows together
    take at most d weight's bytes (``V x C`` in the input dtype), which the backward allocates
    anyway, so the forward never sets the op's peak; evened out as :func:`_even_rows` does
    (~C / 2 rows for 16-bit inputs: 2 chunks of 1728 rows for 3331 rows at C = 4096)."""
    return _even_rows(N, max(1, V * C * itemsize // (4 * V + C * itemsize)))


def masked_ce_forward_gemm(flat_h, h_index, w, b, y, softcap, label_smoothing, z_loss):
    """Per-row loss, lse and correctness of the labelled rows ``flat_h[h_index]`` (the
    contract of :func:`masked_ce_forward`), from cuBLAS logits chunks (:func:`_logits_fp32`)
    reduced by ``_mce_rows_kernel`` without its dz pass."""
    N = h_index.shape[0]
    C = flat_h.shape[1]
    V = w.shape[0]
    dev = flat_h.device
    R = gemm_forward_rows(N, V, C, flat_h.element_size())
    LAST_TILES["fwd"] = f"gemm {cdiv(N, R)} x {R} rows"
    loss = _alloc((N,), torch.float32, dev)
    lse = _alloc((N,), torch.float32, dev)
    arg = _alloc((N,), torch.int32, dev)
    # one chunk buffer, reused, where the GEMM can write into it (else a fresh one per chunk)
    zbuf = _alloc((min(N, R) * V,), torch.float32, dev) if _mm_out_fp32_ok(flat_h) else None
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        hc = flat_h.index_select(0, h_index[r0:r1])
        z = _logits_fp32(hc, w, zbuf[: (r1 - r0) * V].view(r1 - r0, V) if zbuf is not None else None)
        del hc
        _row_stats(z, b, y, loss, lse, arg, r0, softcap, label_smoothing, z_loss)
    return loss, lse, arg == y


# The in-place row move (``_place_rows``) as one kernel launch: program ``p`` owns columns
# ``[p * MOVE_BLOCK_C, ...)`` of every row and walks the labelled rows from the last block of
# ``MOVE_BLOCK_R`` down to the first, loading a block, then (after a barrier: every thread of
# the program has read it) storing it at ``h_index``. Row ``i`` goes to ``h_index[i] >= i``,
# so a block's stores land at or above its first row: on rows the program has already read
# (this block's, behind the barrier, or a later block's, read in an earlier step), never on a
# row still to be read. Programs share no column. No copy, no host loop: the former
# block-by-block copy took ~4 host calls per 1 MiB block (27 blocks at C = 4096, 16k tokens,
# 20% labelled) and its 1 MiB copy was what the eager forward allocated beyond the gradients.
MOVE_BLOCK_R = 256
MOVE_BLOCK_C = 64
MOVE_WARPS = 8


@triton.jit
def _move_rows_kernel(Buf, Idx, N, C, stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows ``[0, N)`` of ``Buf`` (row stride ``stride``) to rows ``Idx`` (strictly
    increasing, ``Idx[i] >= i``), columns ``[program * BLOCK_C, ...)``, in place."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    nblk = tl.cdiv(N, BLOCK_R)
    for k in range(0, nblk):
        rows = (nblk - 1 - k) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < N
        dst = tl.load(Idx + rows, mask=rmask, other=0)
        m = rmask[:, None] & cmask[None, :]
        x = tl.load(Buf + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=m)
        # Every thread's reads of this block before any thread's writes: a destination may be
        # another thread's source row in this very block.
        tl.debug_barrier()
        tl.store(Buf + dst.to(tl.int64)[:, None] * stride + cols[None, :], x, mask=m)


def _move_rows(buf: torch.Tensor, h_index: torch.Tensor) -> None:
    """``buf[h_index] = buf[:N]`` in place (``_move_rows_kernel``); ``buf`` row-contiguous."""
    N, C = h_index.shape[0], buf.shape[1]
    if N == 0 or C == 0:
        return
    _move_rows_kernel[(cdiv(C, MOVE_BLOCK_C),)](
        buf, h_index, N, C, buf.stride(0), BLOCK_R=MOVE_BLOCK_R, BLOCK_C=MOVE_BLOCK_C, num_warps=MOVE_WARPS,
        num_stages=1,
    )


def _place_rows(buf: torch.Tensor, h_index: torch.Tensor, block: int | None = None, zero: bool = True) -> None:
    """Move rows ``[0, N)`` of ``buf`` to rows ``h_index`` (``N`` of them, strictly increasing)
    and (``zero``) zero every other row, in place. Without ``zero`` the other rows keep what
    they held: the eager forward's caller zeroes them later, in the backward's scaling pass
    (:func:`scale_` with ``keep``), which reads and writes every row anyway.

    Row ``i`` goes to ``h_index[i] >= i``. One kernel launch moves them
    (``_move_rows_kernel``, no copy). With ``block`` given (the tests' oracle), or a buffer
    whose rows are not contiguous, blocks of ``block`` rows (default: as many as fit in
    ``PLACE_BLOCK_BYTES``) move last block first, each through a copy of itself: a block's
    destinations lie at or above its first row, where every source row is either its own
    (copied before the move) or a later block's (already moved), so no row is overwritten
    before it is read.
    """
    N = h_index.shape[0]
    if block is None and buf.stride(1) == 1:
        _move_rows(buf, h_index)
    else:
        block = block or max(1, PLACE_BLOCK_BYTES // (buf.shape[1] * buf.element_size()))
        for a in range(cdiv(N, block) * block - block, -1, -block):
            b = min(N, a + block)
            buf.index_copy_(0, h_index[a:b], buf[a:b].clone())
    if zero:
        drop = torch.ones(buf.shape[0], device=buf.device, dtype=torch.bool).index_fill_(0, h_index, False)
        buf.masked_fill_(drop[:, None], 0)


def _scatter_rows(rows: torch.Tensor, h_index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The gradient of every row of hidden: zeros, with ``rows`` at ``h_index`` (unique)."""
    out = torch.zeros((n_rows, rows.shape[1]), device=rows.device, dtype=rows.dtype)
    return out.index_copy_(0, h_index, rows)


class MaskedLinearCEFunction(torch.autograd.Function):
    """Masked linear cross-entropy over the labelled rows of hidden (Triton forward and backward).

    forward(flat_h (rows, C), h_index (N,) int64, w (V, C), b (V,) or None, y (N,) int32,
    softcap, label_smoothing, z_loss, reduction, strategy[, eager]) -> (loss, correct (N,) bool, not
    differentiable); loss is 0-d fp32 for ``mean`` / ``sum`` and the per-row ``(N,)`` fp32
    losses for ``none``. The labelled rows ``flat_h[h_index]`` are gathered here (eager: a
    chunk at a time), used and dropped: nothing of size ``N x C`` is kept for the backward
    (which gathers again if it recomputes), and the gradient of ``flat_h`` is built once,
    full size (no separate gather node with its own copy): by eager's forward in place where
    it can (``eager_plan``), else in the backward. ``strategy`` is ``None`` when no gradient
    will be asked for (the statistics-only forward, one GEMM), else ``"eager"`` (gradients
    computed here, scaled by the upstream gradient in backward) or ``"two_pass"`` (logits
    recomputed in backward). ``eager``: the caller's :func:`plan_eager` for this call (made
    here when None).
    """

    @staticmethod
    @ref.without_autocast  # its GEMMs compute (and write into buffers) in the dtypes chosen here
    def forward(ctx, flat_h, h_index, w, b, y, softcap, label_smoothing, z_loss, reduction, strategy, eager=None):
        N = h_index.shape[0]
        need_h, _, need_w, need_b = ctx.needs_input_grad[:4]
        need_b = need_b and b is not None
        ctx.eager = None
        if strategy == "eager":
            # Gradients of sum(loss): unit scale keeps fp16 dz out of the subnormals (mean's
            # 1 / N is applied with the upstream gradient, after the GEMMs).
            per_row, lse, correct, dh, dw, db, in_grad = masked_ce_eager(
                flat_h, h_index, w, b, y, softcap, label_smoothing, z_loss, need_h, need_w, need_b, eager,
            )
            ctx.eager = (dh, dw, db, in_grad)
        elif strategy == "two_pass" and need_w and GEMM_FORWARD and fp32_logits_available(flat_h):
            per_row, lse, correct = masked_ce_forward_gemm(flat_h, h_index, w, b, y, softcap, label_smoothing, z_loss)
        else:
            h = flat_h.index_select(0, h_index)
            per_row, lse, correct = masked_ce_forward(h, w, b, y, softcap, label_smoothing, z_loss)
            del h
        ctx.save_for_backward(flat_h, h_index, w, b, y, lse)
        ctx.cfg = (softcap, label_smoothing, z_loss, reduction)
        ctx.mark_non_differentiable(correct)
        if reduction == "mean":
            return per_row.sum() / N, correct
        if reduction == "sum":
            return per_row.sum(), correct
        return per_row, correct

    @staticmethod
    @ref.without_autocast
    def backward(ctx, g, _gc):
        flat_h, h_index, w, b, y, lse = ctx.saved_tensors
        softcap, eps, zl, reduction = ctx.cfg
        need_h, _, need_w, need_b = ctx.needs_input_grad[:4]
        need_b = need_b and b is not None
        none = (None,) * 7
        if not (need_h or need_w or need_b):
            return (None, None, None, None) + none
        N = h_index.shape[0]
        g = g.float() / N if reduction == "mean" else g.float()
        if ctx.eager is not None:
            # The forward's gradients of sum(loss) (None where not needed): scaled in place (no
            # copy of dW) and handed over once. A second backward (retain_graph) recomputes below.
            dh, dw, db, in_grad = ctx.eager
            ctx.eager = None
            if in_grad:
                # hidden's whole gradient already, its unlabelled rows unwritten: the labelled
                # rows times their factor (one per row for reduction none), every other row 0
                keep = torch.zeros(flat_h.shape[0], device=g.device, dtype=torch.uint8).index_fill_(0, h_index, 1)
                if g.dim():
                    g = torch.zeros(flat_h.shape[0], device=g.device, dtype=torch.float32).index_copy_(0, h_index, g)
                scale_(dh, g, keep)
            elif dh is not None:
                dh = _scatter_rows(scale_(dh, g), h_index, flat_h.shape[0])
            return (dh, None, scale_(dw, g) if dw is not None else None, db.mul_(g) if db is not None else None) + none
        if g.dim() == 0:
            g = g.expand(N)
        g = g.contiguous()
        n_rows, C = flat_h.shape
        vc = two_pass_plan(N, w.shape[0], n_rows, C, flat_h.element_size(), need_h)
        if vc:
            # hidden's gradient first; the gathered rows, the fp32 accumulator and the dZ
            # buffer in its unlabelled rows' room; d hidden into its first N rows, then moved
            grad, room = _grad_with_room(flat_h, N)
            h = torch.index_select(flat_h, 0, h_index, out=room[: N * C].view(N, C))
            _, dw, db = masked_ce_backward(
                h, w, b, y, lse, g, softcap, eps, zl, need_h, need_w, need_b,
                scratch=room[_aligned(N * C, grad.element_size()):], vc=vc, dh_out=grad[:N],
            )
            del h, room
            _place_rows(grad, h_index)
            return (grad, None, dw, db) + none
        dh, dw, db = masked_ce_backward(
            flat_h.index_select(0, h_index), w, b, y, lse, g, softcap, eps, zl, need_h, need_w, need_b,
        )
        if dh is not None:
            dh = _scatter_rows(dh, h_index, flat_h.shape[0])
        return (dh, None, dw, db) + none


def masked_linear_cross_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    shift: int = 1,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_accuracy: bool = False,
    strategy: str = "auto",
    num_labelled: int | None = None,
):
    """Triton masked linear cross-entropy; the contract of ``reference.masked_linear_cross_entropy_ref``.

    hidden ``(B, T, C)`` or ``(T, C)`` fp16 / bf16 / fp32; weight ``(V, C)`` same dtype;
    labels ``(B, T)`` / ``(T,)`` int64 or int32 with ``ignore_index`` on unlabelled tokens;
    bias ``(V,)`` or None. Returns the fp32 loss (0-d for ``mean`` / ``sum``, the shifted
    label shape for ``none``) and, with ``return_accuracy``, the 0-d fp32 argmax accuracy
    over labelled rows. Inputs are validated by ``ops.masked_linear_cross_entropy``.

    Synchronisation: one, in ``labelled_rows`` (``torch.nonzero``: the number of
    labelled rows sets every later shape), none when ``num_labelled`` gives that number.
    Kernels, the split combine, the reductions and the backward launch without further host
    syncs.
    """
    flat_h, h_index, y_sel, index, shape = ref.labelled_rows(hidden, labels, shift, ignore_index, weight.shape[0],
                                                             num_labelled)
    n = h_index.shape[0]
    if n == 0:
        # 0 from zero-size slices (never hidden's values): exact-zero gradients, never NaN
        loss = ref.all_ignored_loss(hidden, weight, bias, shape, reduction, torch.float32)
        acc = torch.zeros((), device=hidden.device)
        return (loss, acc) if return_accuracy else loss
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    plan = eager = None
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        need_wb = weight.requires_grad or (bias is not None and bias.requires_grad)
        # the eager plan once per call: it decides the strategy and the forward runs it
        eager = plan_eager(n, w.shape[0], flat_h.shape[1], flat_h.shape[0], flat_h.element_size(),
                           hidden.requires_grad, weight.requires_grad, _mm_out_fp32_ok(flat_h))
        plan = choose_strategy(strategy, n, w.shape[0], need_wb, reduction != "none", fp32_logits_available(flat_h),
                               eager.rows, eager.stored is not None)
    loss, correct = MaskedLinearCEFunction.apply(
        flat_h, h_index, w, b, y_sel.to(torch.int32), softcap or 0.0, float(label_smoothing), float(z_loss),
        reduction, plan, eager,
    )
    if reduction == "none":
        full = torch.zeros(shape.numel(), device=hidden.device, dtype=torch.float32)
        loss = full.index_put((index,), loss).reshape(shape)
    if return_accuracy:
        return loss, correct.float().mean()
    return loss

"""Compile every pooling / InfoNCE Triton configuration for sm_90 and sm_80, without a GPU.

The launchers use fixed configurations (no autotuner): pooling ``BLOCK_T x BLOCK_C`` =
``POOL_BLOCK_T x pool_block_c(C)`` (128 channels, or 16..64 for tiny test hidden sizes) with
``POOL_WARPS`` warps; the CE kernels ``CE_BLOCK_R x CE_BLOCK_N`` and ``CE_BWD_BLOCK_M x
CE_BWD_BLOCK_N``; the L2 normalisation kernels ``BLOCK_R x BLOCK_C`` tiles from
``_norm_tile`` (``NORM_BLOCK_C`` elements: ``1 x 1024`` down to ``64 x 16``, with
``NORM_BLOCK_S / BLOCK_R`` row partials summed at a time). Every pooling mode is compiled padded with a
region, packed with and without one, in bf16 (fp16 shares its footprint) and fp32, the
backward with and without the fused normalisation; the smaller channel blocks once. The
normalisation kernels that read or write the input dtype (``X``, ``DX``) are compiled in
bf16 and fp32 at the full tile, in fp32 at every smaller one. These kernels are
bandwidth-bound reductions with no ``tl.dot``: no wgmma is expected.
Fails on compile errors, shared memory over the chip's limit and register spills (spill
stores / loads, ``STL`` / ``LDL``, in the SASS or a ``STACK`` frame, counted by
``helpers.cubin_usage``; cuobjdump's ``LOCAL`` stays 0 when ptxas spills). None is allowed.

Under ``TRITON_INTERPRET=1`` ``@triton.jit`` gives interpreter objects, so each chip compiles
in a subprocess without the interpreter (this file run as a script).
"""
from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("triton")

PTRS = {
    "H": "*E", "DH": "*E", "REG": "*u8", "CU": "*i32", "E": "*fp32", "SSQ": "*fp32", "DEN": "*fp32",
    "SEL": "*i64", "DE": "*fp32", "S": "*fp32", "DS": "*fp32", "LSE": "*fp32", "LOSS": "*fp32",
    "LSE_R": "*fp32", "LSE_C": "*fp32", "G": "*fp32", "EN": "*fp32", "DOT": "*fp32", "NRM": "*fp32",
    "X": "*E", "Y": "*fp32", "DY": "*fp32", "DX": "*E",
}
NORM_KERNELS = ("l2_ssq", "l2_fwd", "l2_dot", "l2_bwd")
FLOATS = ("inv_t", "coef_r", "coef_c")


def configs():
    from llm2vec_fast.kernels.triton import info_nce as tk

    out = []
    for kind in ("fwd", "bwd"):
        # The backward's NORMALIZE variant adds the fused normalisation and its BLOCK_S.
        extras = [{}] if kind == "fwd" else [dict(NORMALIZE=n, BLOCK_S=tk.NORM_BLOCK_S) for n in (False, True)]
        for extra in extras:
            for mode in (0, 1, 2, 3):
                for packed, has_reg in ((False, True), (True, True), (True, False)):
                    for elem in (("bf16", "fp32") if mode == 0 else ("bf16",)):
                        out.append((kind, elem, dict(POOL_MODE=mode, PACKED=packed, HAS_REG=has_reg, **extra,
                                                     BLOCK_T=tk.POOL_BLOCK_T, BLOCK_C=tk.POOL_BLOCK_C), tk.POOL_WARPS))
            for bc in (16, 32, 64):  # tiny hidden sizes (tests)
                out.append((kind, "fp32", dict(POOL_MODE=1, PACKED=False, HAS_REG=True, **extra,
                                               BLOCK_T=tk.POOL_BLOCK_T, BLOCK_C=bc), tk.POOL_WARPS))
    tiles = sorted({tk._norm_tile(1, c)[:3] for c in range(1, 2 * tk.NORM_BLOCK_C)}, key=lambda t: -t[1])
    for kind in NORM_KERNELS:
        for br, bc, bs in tiles:
            io = kind in ("l2_ssq", "l2_fwd", "l2_bwd")  # these read or write the input dtype (X, DX)
            for elem in (("bf16", "fp32") if io and bc == tk.NORM_BLOCK_C else ("fp32",)):
                consts = dict(BLOCK_R=br, BLOCK_C=bc)
                if kind in ("l2_fwd", "l2_bwd"):
                    consts["BLOCK_S"] = bs
                out.append((kind, elem, consts, tk.NORM_WARPS))
    out.append(("ce_lse", "fp32", dict(BLOCK_R=tk.CE_BLOCK_R, BLOCK_N=tk.CE_BLOCK_N), tk.CE_WARPS))
    for sym in (False, True):
        out.append(("ce_bwd", "fp32", dict(SYMMETRIC=sym, BLOCK_M=tk.CE_BWD_BLOCK_M, BLOCK_N=tk.CE_BWD_BLOCK_N),
                    tk.CE_WARPS))
    return out


def _compile_all(cc: int) -> list[dict]:
    from helpers import SMEM_LIMIT, USAGE_KEYS, compile_for, triton_signature

    from llm2vec_fast.kernels.triton import info_nce as tk

    kernels = {"fwd": tk._pool_fwd_kernel, "bwd": tk._pool_bwd_kernel, "ce_lse": tk._ce_lse_kernel,
               "ce_bwd": tk._ce_bwd_kernel, "l2_ssq": tk._l2norm_ssq_kernel, "l2_fwd": tk._l2norm_fwd_kernel,
               "l2_dot": tk._l2norm_dot_kernel, "l2_bwd": tk._l2norm_bwd_kernel}
    res = []
    for kind, elem, consts, warps in configs():
        rid = f"{kind}-{elem}-" + "-".join(f"{k}{int(v)}" for k, v in consts.items()) + f"-sm{cc}"
        r = dict(id=rid, limit=SMEM_LIMIT[cc])
        try:
            info = compile_for(kernels[kind], triton_signature(kernels[kind], consts, PTRS, FLOATS, elem), consts, cc, warps, 1,
                               divisible=set(PTRS))  # 16-byte aligned pointers, as launched
            r.update(ok=True, **{k: info[k] for k in USAGE_KEYS})
        except Exception as e:
            r.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
        res.append(r)
    return res


def test_launchers_use_the_listed_blocks():
    from llm2vec_fast.kernels.triton import info_nce as tk

    assert tk.pool_block_c(4096) == tk.POOL_BLOCK_C
    assert {tk.pool_block_c(c) for c in range(1, 3 * tk.POOL_BLOCK_C)} == {16, 32, 64, tk.POOL_BLOCK_C}
    # Every normalisation tile a launch can pick is compiled (configs() lists them from _norm_tile).
    tiles = {tk._norm_tile(r, c)[:3] for r in (1, 7, 300) for c in range(1, 3 * tk.NORM_BLOCK_C, 7)}
    listed = {(k["BLOCK_R"], k["BLOCK_C"], k["BLOCK_S"]) for kind, _, k, _ in configs() if kind == "l2_fwd"}
    assert tiles == listed and len(tiles) == 7
    assert all(br * bc == tk.NORM_BLOCK_C and br * bs == max(tk.NORM_BLOCK_S, br) for br, bc, bs in tiles)
    # With several rows per tile, one BLOCK_S pass covers every pooled partial of a row.
    assert all(tk._norm_tile(1, c)[2] >= -(-c // tk.POOL_BLOCK_C) for c in range(1, tk.NORM_BLOCK_C))


@pytest.mark.parametrize("cc", [90, 80], ids=["sm90", "sm80"])
def test_compile_configs(cc):
    from helpers import assert_compile_results, run_compile_worker

    results = run_compile_worker(__file__, cc)
    assert len(results) == len(configs())
    assert_compile_results(results, cc)


if __name__ == "__main__":  # the worker: python tests/test_info_nce_compile.py CC
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(_compile_all(int(sys.argv[1]))))

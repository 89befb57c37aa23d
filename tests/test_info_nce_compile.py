"""Compile every pooling / InfoNCE Triton configuration for sm_90 and sm_80, without a GPU.

The launchers use fixed configurations (no autotuner): pooling ``BLOCK_T x BLOCK_C`` =
``POOL_BLOCK_T x pool_block_c(C)`` (128 channels, or 16..64 for tiny test hidden sizes) with
``POOL_WARPS`` warps; the CE kernels ``CE_BLOCK_R x CE_BLOCK_N`` and ``CE_BWD_BLOCK_M x
CE_BWD_BLOCK_N``. Every pooling mode is compiled padded with a region, packed with and
without one, in bf16 (fp16 shares its footprint) and fp32; the smaller channel blocks once.
These kernels are bandwidth-bound reductions with no ``tl.dot``: no wgmma is expected.
Fails on compile errors, register spills and shared memory over the chip's limit.

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
    "LSE_R": "*fp32", "LSE_C": "*fp32", "G": "*fp32",
}
FLOATS = ("inv_t", "coef_r", "coef_c")


def configs():
    from llm2vec_fast.kernels.triton import info_nce as tk

    out = []
    for kind in ("fwd", "bwd"):
        for mode in (0, 1, 2, 3):
            for packed, has_reg in ((False, True), (True, True), (True, False)):
                for elem in (("bf16", "fp32") if mode == 0 else ("bf16",)):
                    out.append((kind, elem, dict(POOL_MODE=mode, PACKED=packed, HAS_REG=has_reg,
                                                 BLOCK_T=tk.POOL_BLOCK_T, BLOCK_C=tk.POOL_BLOCK_C), tk.POOL_WARPS))
        for bc in (16, 32, 64):  # tiny hidden sizes (tests)
            out.append((kind, "fp32", dict(POOL_MODE=1, PACKED=False, HAS_REG=True, BLOCK_T=tk.POOL_BLOCK_T,
                                           BLOCK_C=bc), tk.POOL_WARPS))
    out.append(("ce_lse", "fp32", dict(BLOCK_R=tk.CE_BLOCK_R, BLOCK_N=tk.CE_BLOCK_N), tk.CE_WARPS))
    for sym in (False, True):
        out.append(("ce_bwd", "fp32", dict(SYMMETRIC=sym, BLOCK_M=tk.CE_BWD_BLOCK_M, BLOCK_N=tk.CE_BWD_BLOCK_N),
                    tk.CE_WARPS))
    return out


def _compile_all(cc: int) -> list[dict]:
    from helpers import SMEM_LIMIT, compile_for, triton_signature

    from llm2vec_fast.kernels.triton import info_nce as tk

    kernels = {"fwd": tk._pool_fwd_kernel, "bwd": tk._pool_bwd_kernel, "ce_lse": tk._ce_lse_kernel,
               "ce_bwd": tk._ce_bwd_kernel}
    res = []
    for kind, elem, consts, warps in configs():
        rid = f"{kind}-{elem}-" + "-".join(f"{k}{int(v)}" for k, v in consts.items()) + f"-sm{cc}"
        r = dict(id=rid, limit=SMEM_LIMIT[cc])
        try:
            info = compile_for(kernels[kind], triton_signature(kernels[kind], consts, PTRS, FLOATS, elem), consts, cc, warps, 1,
                               divisible=set(PTRS))  # 16-byte aligned pointers, as launched
            r.update(ok=True, shared=info["shared"], registers=info["registers"], local=info["local"])
        except Exception as e:
            r.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
        res.append(r)
    return res


def test_launchers_use_the_listed_blocks():
    from llm2vec_fast.kernels.triton import info_nce as tk

    assert tk.pool_block_c(4096) == tk.POOL_BLOCK_C
    assert {tk.pool_block_c(c) for c in range(1, 3 * tk.POOL_BLOCK_C)} == {16, 32, 64, tk.POOL_BLOCK_C}


@pytest.mark.parametrize("cc", [90, 80], ids=["sm90", "sm80"])
def test_compile_configs(cc):
    from helpers import assert_compile_results, run_compile_worker

    results = run_compile_worker(__file__, cc)
    assert len(results) == len(configs())
    assert_compile_results(results, cc)


if __name__ == "__main__":  # the worker: python tests/test_info_nce_compile.py CC
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(_compile_all(int(sys.argv[1]))))

"""Compile every attention configuration the autotuner may pick, for sm_90 and sm_80, without a GPU.

Fails on a compile error, register spills, shared memory over the chip's limit, and (sm_90,
fp16 / bf16) on PTX without wgmma. Every configuration is compiled twice: without and with
attention dropout (``DROPOUT``, whose Philox code adds registers; its configurations come
from the same functions with ``dropout=True``). The configurations come from the module's own lists
(``fwd_configs`` / ``bwd_dq_configs`` / ``bwd_dkdv_configs``, the lists the autotuner
prunes to), so a config added there is compiled here. Head dims 80 and 96 share
``BLOCK_D = 128`` and its footprint, so 80 stands for both (it also compiles the head-dim
mask); bf16 stands for fp16 (same footprint).

Without a GPU, conftest.py turns on ``TRITON_INTERPRET=1``, under which ``@triton.jit``
returns interpreter objects that cannot be compiled; each group therefore compiles in a
subprocess without the interpreter (this file run as a script), one per (kernel, chip) so
``pytest -n 2`` spreads them.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

triton = pytest.importorskip("triton")

HEAD_DIMS = (32, 64, 80, 256)  # one per distinct BLOCK_D; 80 also covers 96 and 128's tiles
# fp32 runs one FMA tile per BLOCK_D (no tensor cores, the same code for both chips): the
# two largest BLOCK_D, which bound the smaller ones' footprint, compiled for sm_90.
FP32_HEAD_DIMS = (80, 256)


def _kinds():
    from llm2vec_fast.kernels.triton import attention as tk

    return {
        "fwd": (tk._attn_fwd_kernel, tk.fwd_configs),
        "dq": (tk._attn_bwd_dq_kernel, tk.bwd_dq_configs),
        "dkdv": (tk._attn_bwd_dkdv_kernel, tk.bwd_dkdv_configs),
    }


def _case_id(kind, hd, fp32, c, cc, dropout=False):
    return (f"{kind}-d{hd}-{'fp32' if fp32 else 'bf16'}{'-dropout' if dropout else ''}"
            f"-m{c.kwargs['BLOCK_M']}n{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}-sm{cc}")


def _compile_group(kind: str, cc: int, dropout: bool = False, only: str | None = None) -> list[dict]:
    """Compile every (head dim, dtype, config) of one kernel for one chip, with or without the
    dropout code (``DROPOUT``, from its own config lists); runs without the interpreter."""
    from helpers import SMEM_LIMIT, compile_for, triton_signature

    from llm2vec_fast.kernels.triton import attention as tk

    kernel, cfgs = _kinds()[kind]
    ptrs = {n: "*E" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    ptrs.update(LSE="*fp32", DELTA="*fp32", CU_Q="*i32", CU_K="*i32", RANGE="*i32", MASK="*u8", SEED="*i64")
    results, seen = [], set()
    for hd in HEAD_DIMS:
        for fp32 in (False, True) if hd in FP32_HEAD_DIMS and cc == 90 else (False,):
            for c in cfgs(hd, fp32, dropout):
                key = (hd, fp32, str(c))
                if key in seen:
                    continue
                seen.add(key)
                # The padded layout with a mask and softcap is the superset of the code paths.
                consts = dict(
                    HEAD_DIM=hd, BLOCK_D=tk._block_d(hd), IS_VARLEN=False, HAS_MASK=True, HAS_SOFTCAP=True,
                    DOT_PREC="ieee" if fp32 else "tf32", BLOCK_M=c.kwargs["BLOCK_M"], BLOCK_N=c.kwargs["BLOCK_N"],
                    DROPOUT=dropout, ROUNDS=tk.PHILOX_ROUNDS,
                )
                elem = "fp32" if fp32 else "bf16"
                sig = triton_signature(kernel, consts, ptrs, ("sm_scale", "softcap", "drop_scale"), elem)
                r = dict(id=_case_id(kind, hd, fp32, c, cc, dropout), fp32=fp32)
                if only and only not in r["id"]:
                    continue
                try:
                    # As launched: 16-byte aligned pointers; token / head / batch strides of q, k, v and
                    # their gradients are multiples of D (>= 32), so Triton specialises them as /16.
                    div = set(ptrs) | {n for n in kernel.arg_names if n.startswith("stride_") and n[-1] in "bth"
                                       and not n.startswith(("stride_l", "stride_m"))}
                    info = compile_for(kernel, sig, consts, cc, c.num_warps, c.num_stages, divisible=div)
                    r.update(ok=True, shared=info["shared"], registers=info["registers"], local=info["local"],
                             wgmma="wgmma" in info["ptx"], limit=SMEM_LIMIT[cc])
                except Exception as e:  # reported by the test, with the config's name
                    r.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
                results.append(r)
    return results


# The DROPOUT=True kernels are separate compilations (the Philox code only exists there):
# their own groups, so pytest -n 2 spreads them too.
GROUPS = [(k, cc, d) for k in ("fwd", "dq", "dkdv") for cc in (90, 80) for d in (False, True)]


def test_config_lists_cover_every_head_dim():
    from llm2vec_fast.kernels.triton import attention as tk

    for hd in tk.SUPPORTED_HEAD_DIMS:
        for fp32 in (False, True):
            for dropout in (False, True):
                for f in (tk.fwd_configs, tk.bwd_dq_configs, tk.bwd_dkdv_configs):
                    assert f(hd, fp32, dropout), f"{f.__name__}({hd}, fp32={fp32}, dropout={dropout}) is empty"
                for kind in ("fwd", "dq", "dkdv"):
                    for cuda in (True, False):
                        for s in (64, 4096):
                            c = tk.heuristic_config(kind, hd, fp32, s, cuda, dropout)
                            if cuda:  # the heuristic picks from the compiled list
                                assert str(c) in {str(x) for x in tk._configs(kind, hd, fp32, dropout)}


@pytest.mark.parametrize("kind,cc,dropout", GROUPS, ids=[f"{k}-sm{cc}{'-dropout' if d else ''}" for k, cc, d in GROUPS])
def test_compile_configs(kind, cc, dropout):
    from helpers import assert_compile_results, run_compile_worker

    assert_compile_results(run_compile_worker(__file__, kind, cc, int(dropout)), cc)


if __name__ == "__main__":  # the worker: python tests/test_attention_compile.py KIND CC DROPOUT [ONLY]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(_compile_group(sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3])), *sys.argv[4:5])))

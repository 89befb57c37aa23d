"""Compile every masked-CE configuration the autotuners may pick, for sm_90 and sm_80, without a GPU.

The list is the module's own ``ALL_CONFIGS`` (``FWD_CONFIGS`` / ``BWD_CONFIGS`` for 16-bit
inputs, ``*_FP32`` for fp32), so a config added there is compiled here. Each compiles in
every combination of the optional features (bias, softcap, label smoothing), each a kernel
of its own to ptxas: all of them on is the most code, not always the most registers (the
former fp32 128x64 forward tile spilled with smoothing alone and was clean with all three).
16-bit inputs stand for fp16 and bf16 (same footprint); ``EVEN_K`` is the real path
(C % 64 == 0 for every LM this serves) and the masked-K variant is compiled for the first
config of each kernel, with every feature on. Fails on compile errors, register spills (spill stores / loads,
``STL`` / ``LDL``, in the SASS or a ``STACK`` frame, counted by ``helpers.cubin_usage``;
cuobjdump's ``LOCAL`` stays 0 when ptxas spills), shared memory over the chip's limit, and a
missing ``wgmma`` in the sm_90 PTX of the 16-bit matmul kernels. No spill is allowed. The
eager strategy's row kernel (``_mce_rows_kernel``, no matmul) is compiled at every
``(BLOCK_V, num_warps)`` its launcher picks on CUDA, and its backward's scaling kernel
(``_scale_kernel``) in each of its variants.

Under ``TRITON_INTERPRET=1`` (set by conftest.py without a GPU) ``@triton.jit`` returns
interpreter objects that cannot be compiled, so each (chip) group compiles in a subprocess
without the interpreter (this file run as a script).
"""
from __future__ import annotations

import itertools
import json
import os
import sys

import pytest

pytest.importorskip("triton")

PTRS = {
    "H": "*E", "W": "*E", "Bias": "*E", "DZ": "*E", "Y": "*i32", "Arg": "*i32",
    "Stats": "*fp32", "Lse": "*fp32", "G": "*fp32",
}
FLOATS = ("softcap", "smoothing", "z_loss")
# Arguments a real launch passes as multiples of 16 (16-byte aligned pointers, C and row
# strides of LM shapes, 256-aligned split widths and chunk starts). Triton's launcher
# specialises them as ``tt.divisibility = 16``; without the hint the loads are not vectorised,
# cp.async / the multi-stage pipeline is not generated, and the smem / register figures
# would describe a kernel that never runs.
DIVISIBLE = set(PTRS) | {"C", "stride_h", "stride_w", "stride_dz", "split_cols", "v0"}


def _compile_all(cc: int) -> list[dict]:
    from helpers import SMEM_LIMIT, USAGE_KEYS, compile_for, triton_signature

    from llm2vec_fast.kernels.triton import masked_ce as mce

    kernels = {"fwd": mce._mce_fwd_kernel, "bwd": mce._mce_bwd_kernel}
    out = []
    seen_kind = set()
    for kind, elem, c in mce.ALL_CONFIGS:
        flags = ("HAS_BIAS", "HAS_SOFTCAP", "HAS_SMOOTH") if kind == "fwd" else ("HAS_BIAS", "HAS_SOFTCAP")
        variants = [(True, on) for on in itertools.product((True, False), repeat=len(flags))]
        if elem != "fp32" and (kind, elem) not in seen_kind:
            seen_kind.add((kind, elem))
            variants.append((False, (True,) * len(flags)))
        for even_k, on in variants:
            kernel = kernels[kind]
            consts = dict(
                zip(flags, on), IEEE=elem == "fp32", EVEN_K=even_k,
                BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
            )
            sig = triton_signature(kernel, consts, PTRS, FLOATS, elem)
            feats = "+".join(f[4:].lower() for f, v in zip(flags, on) if v) or "plain"  # e.g. bias+softcap
            rid = (
                f"{kind}-{elem}-m{c['BLOCK_M']}n{c['BLOCK_N']}k{c['BLOCK_K']}"
                f"w{c['num_warps']}s{c['num_stages']}-{feats}{'' if even_k else '-maskK'}-sm{cc}"
            )
            r = dict(id=rid, fp32=elem == "fp32", limit=SMEM_LIMIT[cc])
            try:
                info = compile_for(kernel, sig, consts, cc, c["num_warps"], c["num_stages"], divisible=DIVISIBLE)
                r.update(ok=True, **{k: info[k] for k in USAGE_KEYS}, wgmma="wgmma" in info["ptx"])
            except Exception as e:  # reported by the test with the config's name
                r.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
            out.append(r)
    out += _compile_rows(cc) + _compile_scale(cc) + _compile_move(cc)
    return out


def _compile_move(cc: int) -> list[dict]:
    """The in-place row move (``_move_rows_kernel``), 16-bit and fp32 rows. Its barrier
    must sit between the block's loads and its stores (a destination can be another thread's
    source row of the same block): the PTX's first ``bar.sync`` comes after the first global
    load of the loop body and before its first global store."""
    from helpers import SMEM_LIMIT, USAGE_KEYS, compile_for, triton_signature

    from llm2vec_fast.kernels.triton import masked_ce as mce

    out = []
    consts = dict(BLOCK_R=mce.MOVE_BLOCK_R, BLOCK_C=mce.MOVE_BLOCK_C)
    for elem in ("bf16", "fp32"):
        sig = triton_signature(mce._move_rows_kernel, consts, {"Buf": "*E", "Idx": "*i64"}, (), elem)
        r = dict(id=f"move-{elem}-sm{cc}", fp32=elem == "fp32", limit=SMEM_LIMIT[cc])
        try:
            info = compile_for(mce._move_rows_kernel, sig, consts, cc, mce.MOVE_WARPS, 1,
                               divisible={"Buf", "Idx", "C", "stride"})
            r.update(ok=True, **{k: info[k] for k in USAGE_KEYS})
            ptx = info["ptx"]
            first = {op: ptx.find(op) for op in ("ld.global.v4", "bar.sync", "st.global.v4")}
            r["barrier_between"] = 0 <= first["ld.global.v4"] < first["bar.sync"] < first["st.global.v4"]
        except Exception as e:
            r.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
        out.append(r)
    return out


def _compile_scale(cc: int) -> list[dict]:
    """The eager backward's scaling kernel (``scale_``): 16-bit and fp32 x, one factor or one
    per row, with and without the rows it zeroes (``keep``)."""
    from helpers import SMEM_LIMIT, USAGE_KEYS, compile_for, triton_signature

    from llm2vec_fast.kernels.triton import masked_ce as mce

    out = []
    # the row-wise variants launch BLOCK = min(SCALE_BLOCK, next power of two of the row): 4096
    # at C >= 4096, 1024 at SmolLM2's C = 576
    for elem, per_row, keep, block in itertools.product(("bf16", "fp32"), (False, True), (False, True), (1024, 4096)):
        if block != mce.SCALE_BLOCK and not (per_row or keep):
            continue
        consts = dict(PER_ROW=per_row, HAS_KEEP=keep, BLOCK=block)
        sig = triton_signature(mce._scale_kernel, consts, {"X": "*E", "G": "*fp32", "KEEP": "*u8"}, (), elem)
        r = dict(id=f"scale-{elem}-{'rows' if per_row else 'scalar'}{'-keep' if keep else ''}-b{block}-sm{cc}",
                 fp32=elem == "fp32", limit=SMEM_LIMIT[cc])
        try:
            info = compile_for(mce._scale_kernel, sig, consts, cc, mce.SCALE_WARPS, 1,
                               divisible={"X", "G", "KEEP", "cols"})
            r.update(ok=True, **{k: info[k] for k in USAGE_KEYS})
        except Exception as e:
            r.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
        out.append(r)
    return out


# Vocabulary sizes that reach every (BLOCK_V, warps) the row kernel launches on CUDA.
ROWS_VOCABS = (16, 200, 1000, 2048, 32000, 151936)


def _compile_rows(cc: int) -> list[dict]:
    """The eager strategy's row kernel (memory-bound, no tl.dot): every launch shape, dz in a
    16-bit dtype and in fp32, all options on; with its dz pass (eager), with dz also stored
    in the blocked layout (stored eager) and without (the two-pass strategy's GEMM forward,
    statistics only)."""
    from helpers import SMEM_LIMIT, USAGE_KEYS, compile_for, triton_signature

    from llm2vec_fast.kernels.triton import masked_ce as mce

    kernel = mce._mce_rows_kernel
    ptrs = {"Z": "*fp32", "Bias": "*E", "Y": "*i32", "DZ": "*E", "Loss": "*fp32", "Lse": "*fp32", "Arg": "*i32",
            "DZT": "*E", "DZB": "*E"}
    out = []
    # (WRITE_DZ, STORE_BLOCKS): eager, stored eager, statistics only
    modes = {(True, False): "", (True, True): "-stored", (False, False): "-stats"}
    for bv, warps in sorted({mce._rows_block(V, True) for V in ROWS_VOCABS}):
        for elem, (write_dz, store) in itertools.product(("bf16", "fp32"), modes):
            consts = dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_SMOOTH=True, BLOCK_V=bv, WRITE_DZ=write_dz,
                          STORE_BLOCKS=store, STAGES=mce.ROWS_STAGES)
            sig = triton_signature(kernel, consts, ptrs, FLOATS, elem)
            r = dict(id=f"rows-{elem}-v{bv}w{warps}{modes[write_dz, store]}-sm{cc}", fp32=elem == "fp32",
                     limit=SMEM_LIMIT[cc])
            try:
                info = compile_for(kernel, sig, consts, cc, warps, 1, divisible=set(ptrs) | {"stride_z", "stride_dz"})
                r.update(ok=True, **{k: info[k] for k in USAGE_KEYS})
                # the block loops are software-pipelined: their loads are cp.async copies
                r.update(cp_async=("cp.async" in info["ptx"]) or mce.ROWS_STAGES < 2)
            except Exception as e:
                r.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
            out.append(r)
    return out


def test_config_lists_are_what_the_autotuners_use():
    from llm2vec_fast.kernels.triton import masked_ce as mce

    def as_tuples(tuned):
        return sorted(
            (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in tuned.configs
        )

    def listed(kind, elem):
        return sorted(
            (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"])
            for k, e, c in mce.ALL_CONFIGS if k == kind and e == elem
        )

    assert as_tuples(mce._fwd_tuned) == listed("fwd", "bf16")
    assert as_tuples(mce._bwd_tuned) == listed("bwd", "bf16")
    assert as_tuples(mce._fwd_tuned_fp32) == listed("fwd", "fp32")
    assert as_tuples(mce._bwd_tuned_fp32) == listed("bwd", "fp32")
    # the forward's splits are cut in multiples of every BLOCK_N (no stale partials)
    for _, _, c in mce.ALL_CONFIGS:
        assert mce.SPLIT_ALIGN % c["BLOCK_N"] == 0 and 64 % c["BLOCK_K"] == 0


@pytest.mark.parametrize("cc", [90, 80], ids=["sm90", "sm80"])
def test_compile_configs(cc):
    from helpers import assert_compile_results, run_compile_worker

    results = run_compile_worker(__file__, cc)
    assert_compile_results(results, cc)
    moves = [r for r in results if r["id"].startswith("move-")]
    assert len(moves) == 2 and all(r["barrier_between"] for r in moves), moves
    rows = [r for r in results if r["id"].startswith("rows-")]
    assert rows and all(r["cp_async"] for r in rows), [r["id"] for r in rows if not r["cp_async"]]


if __name__ == "__main__":  # the worker: python tests/test_masked_ce_compile.py CC
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(_compile_all(int(sys.argv[1]))))

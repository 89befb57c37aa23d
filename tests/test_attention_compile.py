"""Compile every attention configuration the autotuner may pick, for sm_90 and sm_80, without a GPU.

Fails on a compile error, shared memory over the chip's limit, (sm_90, fp16 / bf16) PTX
without wgmma, and register spills: spill stores / loads (``STL`` / ``LDL``) in the SASS or
a ``STACK`` frame, as counted by ``helpers.cubin_usage`` (cuobjdump's ``LOCAL`` stays 0 when
ptxas spills, so it alone never caught one). The cases where no spill-free configuration
was found are listed in ``SPILL_ALLOWANCES`` with their spill-store count, which may not
grow. Every configuration is compiled twice: without and with attention dropout
(``DROPOUT``, whose Philox code adds registers; its configurations come from the same
functions with ``dropout=True``), and the 16-bit ones without dropout once per layout
variant (``VARIANTS``: dense, packed, padded with a mask; each with and without softcap;
the forward and dQ also for a mask known to have no holes),
since each is a kernel of its own to ptxas. The configurations come from the module's own lists
(``fwd_configs`` / ``bwd_dq_configs`` / ``bwd_dkdv_configs`` for each chip, the lists
the autotuner gets on that chip), so a config added there is compiled here. Head dims 80 and 96 share
``BLOCK_D = 128`` and its head-dim mask, so 80 stands for both; 128 fills the block and is
compiled too (``HEAD_DIMS``); bf16 stands for fp16 (same footprint). fp32 is compiled for every head dim on
both chips. The TMA tiles (sm_90) must show tensor bulk copies in their PTX; the forward's and
dQ's compile in every variant but the two whose masks may have holes, which never launch them
(the span variants stand in), the dK/dV kernel's in all.

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

# One per distinct code shape: 80 pads to BLOCK_D 128 with a head-dim mask and stands for
# 96 too; 128 fills the block and compiles without that mask, which ptxas allocates
# differently (the D = 128 forward's masked softcapped variant spills 7 STL, D = 80's none).
HEAD_DIMS = (32, 64, 80, 128, 256)
# fp32 runs FMA dots (no tensor cores) on its own small tiles, compiled for every BLOCK_D
# and both chips: ptxas spills them differently per chip (dK/dV's 16 x 16 at BLOCK_D 256 on
# one stage: 0 STL on sm_90, 2 on sm_80), and the smaller BLOCK_D do not follow the larger
# ones (the former 32 x 32 forward at D = 64, not compiled then, spilled ~500 STL).
FP32_HEAD_DIMS = HEAD_DIMS
# The kernels' layout constexprs: (IS_VARLEN, HAS_MASK, HAS_SOFTCAP). Each is its own
# compiled kernel, and a superset of code paths is not a superset of registers: with a mask
# but no softcap the D = 128 forward spilled ~30 STL and without a mask the dK/dV kernel
# 74, where the masked softcapped variant spilled 0 and 60. So the 16-bit kernels without
# dropout (what LLM2Vec training and encoding launch) compile every variant, D = 80 excepted
# (see _variants); dropout and fp32 compile the masked softcapped one (the rest would be ~500
# more compiles, ~7 CI minutes; on a 27 Nov survey their other variants spilled up to ~2x the
# allowances below, and 4-12 STL in fp32 dK/dV where the superset is clean).
VARIANTS = {
    "dense": (False, False, False),       # (B, S, H, D) without a mask
    "dense-softcap": (False, False, True),
    "varlen": (True, False, False),       # packed sequences
    "varlen-softcap": (True, False, True),
    "mask": (False, True, False),         # padded with a mask
    "mask-softcap": (False, True, True),
    # the forward and dQ for a mask known to have no holes (MASK_HOLES off: hf PaddingInfo's
    # left / right padding): only their loop copy for spans is compiled
    "mask-spans": (False, True, False),
    "mask-spans-softcap": (False, True, True),
    # the dK/dV kernels for the dense layout with S a multiple of EVEN_M_ROWS (EVEN_M: query
    # blocks without row masks)
    "dense-even": (False, False, False),
    "dense-even-softcap": (False, False, True),
}
SPAN_VARIANTS = ("mask-spans", "mask-spans-softcap")
EVEN_VARIANTS = ("dense-even", "dense-even-softcap")


def _variants(kind: str, hd: int, fp32: bool, dropout: bool):
    # D = 80 (BLOCK_D 128 with a head-dim mask) spilled within 1-2 STL of D = 128 in every
    # variant of the survey: the superset alone there.
    # The dK/dV kernels' EVEN_M copy has no row masks: not within the superset, built beside it.
    dkdv = kind.startswith("dkdv")
    if fp32 or dropout or kind == "delta" or hd == 80:
        return ["mask-softcap"] + (["dense-even-softcap"] if dkdv and not fp32 else [])  # EVEN_M: 16-bit only
    # MASK_HOLES: the forward and dQ only; EVEN_M: dK/dV only
    return [v for v in VARIANTS if v not in (EVEN_VARIANTS if not dkdv else SPAN_VARIANTS)]


# Register spills the test allows: the cases where no spill-free configuration was found, or
# where the spill-free ones measured much slower on a GPU (one case, said in its row).
# A spill is any STL / LDL in the SASS or a STACK frame (cuobjdump's LOCAL stays 0 when
# ptxas spills; see helpers.cubin_usage). Each row: kernel, case (head dim, dtype, dropout
# as in the result ids; ``:variant,...`` limits the row to those layout variants), chip, the
# most spill stores (STL) any listed configuration of that case may have in any variant the
# row covers (today's count, so any growth fails), and why. sm_90 needs 64 rows per
# warpgroup in the wgmma's M (query rows for the forward and dQ, key rows for dK/dV), so a
# tile that is spill-free only with fewer rows does not count as an alternative there. sm_80
# has no such constraint, and where the shared lists spilled on sm_80 it has its own
# spill-free tiles (attention.SM80_CONFIGS): no 16-bit allowance is left for it. Counts of
# candidates tried are the tiles (BLOCK_M, BLOCK_N, warps, stages) compiled while choosing.
SPILL_ALLOWANCES = [
    # kernel, case, cc, max STL, reason
    ("dkdv", "d80-bf16", 90, 57, "measured, not for want of a tile that spills less: on the H200 (git c3c84b9) "
     "64 x 64 on 4 warps ran the D = 128 backward at 381 TFLOP/s and 64 x 128 on 8 warps at 366, against "
     "295-305 for the 32-row tiles (attention_tiles.jsonl); 64 x 64 w4 spills most (55 STL here, 37 for 64 x 128; "
     "57 in its EVEN_M softcapped copy)"),
    ("dkdv_atomic", "d80-bf16", 90, 64, "untimed: the spill-free tiles at BLOCK_D 128 have 32 key rows, and the "
     "separate dK/dV kernel ran 1.7-2.2x faster on its spilling 64-row tile than on those; 64 x 128 w8 s1 "
     "(64 STL) and 64 x 64 w8 s1 (41) are listed beside two spill-free 32-row tiles for the autotuner to weigh"),
    ("dkdv", "d128-bf16", 90, 78, "as at D = 80 (64 x 64 w4 s2 in the packed softcapped variant spills most; 39 dense)"),
    ("dkdv_atomic", "d128-bf16", 90, 64, "as at D = 80"),
    ("fwd", "d128-bf16:mask,mask-softcap", 90, 30, "the masked variants of the 128 x 128 tile on 8 warps (7 STL with softcap), which "
     "the sweep measured fastest unmasked (494-518 TFLOP/s at S = 4k against 480-494 for 128 x 64, listed beside "
     "it and spill-free): the key loop's copy for masks with holes reads the mask per column (32 byte loads per "
     "thread and block) and values around the loops spill; compiled without that copy (mask-spans variants, "
     "masks known hole-free) it is spill-free (D = 80, not compiled per variant: 30); 29 -> 30 when the kernels "
     "began reading their sequence from the longest-first order (a loaded index ptxas cannot rematerialise)"),
    ("dkdv", "d256-bf16", 90, 62, "no spill-free tile with 64 key rows among 10 tried (the former 32 x 64 on 4 "
     "warps spilled 1023 STL); 16 x 64 on 8 warps spills least"),
    ("dkdv", "d256-bf16-dropout", 90, 85, "as without dropout; the spill-free 32 x 32 tile has no wgmma (83 -> 85 "
     "when V of keys outside a padded span began loading as zeros, 28 Nov)"),
    # fp32 (FMA dots, compiled here for sm_90 and sm_80): 16 x 16 is the smallest tl.dot tile and
    # 8 warps with 2-3 stages spill least; tried 16-32 x 16-32 tiles on 1-16 warps, 1-3 stages.
    ("fwd", "d256-fp32", 90, 70, "FMA dot over 256-wide rows; no spill-free tile among 11 tried"),
    ("fwd", "d256-fp32", 80, 56, "FMA dot over 256-wide rows; no spill-free tile among 11 tried"),
    ("fwd", "d256-fp32-dropout", 90, 83, "as without dropout"),
    ("fwd", "d256-fp32-dropout", 80, 66, "as without dropout"),
    ("dq", "d80-fp32", 90, 50, "FMA dot over 128-wide rows; no spill-free tile among 17 tried"),
    ("dq", "d80-fp32", 80, 48, "FMA dot over 128-wide rows; no spill-free tile among 17 tried"),
    ("dq", "d80-fp32-dropout", 90, 62, "as without dropout"),
    ("dq", "d80-fp32-dropout", 80, 54, "as without dropout"),
    ("dq", "d128-fp32", 90, 48, "as at D = 80"),
    ("dq", "d128-fp32", 80, 48, "as at D = 80"),
    ("dq", "d128-fp32-dropout", 90, 62, "as at D = 80"),
    ("dq", "d128-fp32-dropout", 80, 54, "as at D = 80"),
    ("dq", "d256-fp32", 90, 530, "FMA dot over 256-wide rows; no spill-free tile among 10 tried (529 -> 530 "
     "when padded rows' q and dO began loading as zeros, 28 Nov)"),
    ("dq", "d256-fp32", 80, 496, "FMA dot over 256-wide rows; no spill-free tile among 10 tried"),
    ("dq", "d256-fp32-dropout", 90, 513, "as without dropout (512 -> 513 likewise)"),
    ("dq", "d256-fp32-dropout", 80, 518, "as without dropout"),
    ("dkdv", "d256-fp32-dropout", 90, 10, "16 x 16 on 8 warps, 3 stages: spill-free until K of keys outside a padded "
     "span began loading as zeros with softcap (28 Nov; selecting their dK at the end instead spilled the "
     "D = 32 fp32 dropout tile on both chips)"),
    ("dkdv", "d80-fp32-dropout", 80, 2, "no tile of 14 tried is spill-free on both chips with and without dropout; "
     "16 x 16 on 8 warps, 3 stages spills only here"),
]


def _allowances(kind: str, cc: int) -> dict:
    """SPILL_ALLOWANCES of one kernel and chip, keyed by the results' ``case``."""
    return {f"{k}-{case}": (most, why) for k, case, c, most, why in SPILL_ALLOWANCES if k == kind and c == cc}


def _allowance_case(kind: str, case: str, cc: int, variant: str) -> str:
    """A result's ``case``: ``case`` itself, or ``case:variants`` where an allowance row
    covers only those layout variants (the others of that case must stay spill-free)."""
    for k, row, c, _, _ in SPILL_ALLOWANCES:
        base, _, only = row.partition(":")
        if k == kind and c == cc and only and base == case and variant in only.split(","):
            return row
    return case


def _kinds():
    from llm2vec_fast.kernels.triton import attention as tk

    def delta_configs(hd, fp32, dropout, cc):  # the dQ kernel's delta pass: one fixed launch
        return [] if dropout else [tk._cfg(tk.DELTA_BLOCK_M, 16, tk.DELTA_WARPS, 1)]

    return {
        "fwd": (tk._attn_fwd_kernel, tk.fwd_configs),
        "dq": (tk._attn_bwd_dq_kernel, tk.bwd_dq_configs),
        "dkdv": (tk._attn_bwd_dkdv_kernel, tk.bwd_dkdv_configs),
        "dkdv_atomic": (tk._attn_bwd_dkdv_kernel, tk.bwd_dkdv_atomic_configs),
        "delta": (tk._attn_bwd_dq_kernel, delta_configs),
    }


def _case(kind, hd, fp32, dropout=False):
    return f"{kind}-d{hd}-{'fp32' if fp32 else 'bf16'}{'-dropout' if dropout else ''}"


def _case_id(kind, hd, fp32, c, cc, dropout=False, variant="mask-softcap"):
    split = "-split" if c.kwargs.get("SPLIT_M") else ""
    split += "-tma" if c.kwargs.get("TMA") else ""
    return (f"{_case(kind, hd, fp32, dropout)}-{variant}"
            f"-m{c.kwargs['BLOCK_M']}n{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}{split}-sm{cc}")


def _compile_one(kind: str, hd: int, fp32: bool, c, cc: int, dropout: bool = False, variant: str = "mask-softcap",
                 keep_cubin: bool = False) -> dict:
    """Compile one configuration of one layout variant for one chip and return its result
    (runs without the interpreter; ``keep_cubin``: with the cubin as hex)."""
    from helpers import SMEM_LIMIT, USAGE_KEYS, compile_for, triton_signature

    from llm2vec_fast.kernels.triton import attention as tk

    kernel = _kinds()[kind][0]
    ptrs = {n: "*E" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    ptrs.update(LSE="*fp32", LSE2="*fp32", DELTA="*fp32", CU_Q="*i32", CU_K="*i32", RANGE="*i32", MASK="*u8", SEED="*i64", ORDER="*i32")
    if kernel is tk._attn_bwd_dkdv_kernel:
        ptrs["DQ"] = "*fp32"  # the atomic backward's accumulator (a dummy without ATOMIC_DQ)
    varlen, mask, softcap = VARIANTS[variant]
    consts = dict(
        HEAD_DIM=hd, BLOCK_D=tk._block_d(hd), IS_VARLEN=varlen, HAS_MASK=mask, HAS_SOFTCAP=softcap,
        DOT_PREC="ieee" if fp32 else "tf32", BLOCK_M=c.kwargs["BLOCK_M"], BLOCK_N=c.kwargs["BLOCK_N"],
        DROPOUT=dropout, ROUNDS=tk.PHILOX_ROUNDS,
    )
    if kernel is tk._attn_bwd_dkdv_kernel:
        consts["ATOMIC_DQ"] = kind == "dkdv_atomic"
        consts["EVEN_M"] = variant in EVEN_VARIANTS
        consts["SPLIT_M"] = bool(c.kwargs.get("SPLIT_M", False))
        consts["TMA"] = bool(c.kwargs.get("TMA", False))
    if kernel is tk._attn_bwd_dq_kernel:
        consts["DELTA_ONLY"] = kind == "delta"
        consts["TMA"] = bool(c.kwargs.get("TMA", False))
    if kernel is tk._attn_fwd_kernel or kind == "dq":
        consts["MASK_HOLES"] = mask and variant not in SPAN_VARIANTS
    elem = "fp32" if fp32 else "bf16"
    if kernel is tk._attn_fwd_kernel:
        # the TMA tiles' host descriptors (4-D, one row block of one head), else None
        tma = bool(c.kwargs.get("TMA", False))
        consts["TMA"] = tma
        bd = tk._block_d(hd)
        for name, rows in (("QD", c.kwargs["BLOCK_M"]), ("KD", c.kwargs["BLOCK_N"]), ("VD", c.kwargs["BLOCK_N"])):
            if tma:
                ptrs[name] = f"tensordesc<{elem}[1,{rows},1,{bd}]>"
            else:
                consts[name] = None
    sig = triton_signature(kernel, consts, ptrs, ("sm_scale", "softcap", "drop_scale"), elem)
    case = f"{kind}-{_allowance_case(kind, _case(kind, hd, fp32, dropout)[len(kind) + 1:], cc, variant)}"
    r = dict(id=_case_id(kind, hd, fp32, c, cc, dropout, variant), case=case, fp32=fp32)
    try:
        # As launched: 16-byte aligned pointers; token / head / batch strides of q, k, v and
        # their gradients are multiples of D (>= 32), so Triton specialises them as /16.
        div = {n for n, t in ptrs.items() if t.startswith("*")} | {n for n in kernel.arg_names if n.startswith("stride_") and n[-1] in "bth"
                           and not n.startswith(("stride_l", "stride_m"))}
        info = compile_for(kernel, sig, consts, cc, c.num_warps, c.num_stages, divisible=div)
        r.update(ok=True, **{k: info[k] for k in USAGE_KEYS}, limit=SMEM_LIMIT[cc])
        if keep_cubin:
            r["cubin"] = info["cubin"].hex()
        if kind != "delta":  # the delta pass has no matmul
            r["wgmma"] = "wgmma" in info["ptx"]
        if c.kwargs.get("TMA"):  # the tile's loads are tensor-map bulk copies
            r["tma"] = "cp.async.bulk.tensor" in info["ptx"]
    except Exception as e:  # reported by the test, with the config's name
        r.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
    return r


def _compile_group(kind: str, cc: int, dropout: bool = False, only: str | None = None) -> list[dict]:
    """Compile every (head dim, dtype, config, layout variant) of one kernel for one chip, with
    or without the dropout code (``DROPOUT``, from its own config lists); runs without the
    interpreter."""
    cfgs = _kinds()[kind][1]
    results, seen = [], set()
    for hd in HEAD_DIMS:
        for fp32 in (False, True) if hd in FP32_HEAD_DIMS else (False,):
            for c in cfgs(hd, fp32, dropout, cc):
                for variant in _variants(kind, hd, fp32, dropout):
                    if c.kwargs.get("TMA") and kind != "dkdv" and variant in ("mask", "mask-softcap"):
                        # the forward's and dQ's TMA tiles never launch with a mask that may have holes
                        # (attention._tma_ok, the kernels' static_assert): their masked variants are the
                        # span ones
                        variant = {"mask": "mask-spans", "mask-softcap": "mask-spans-softcap"}[variant]
                    key = (hd, fp32, str(c), variant)
                    if key in seen or (only and only not in _case_id(kind, hd, fp32, c, cc, dropout, variant)):
                        continue
                    seen.add(key)
                    results.append(_compile_one(kind, hd, fp32, c, cc, dropout, variant))
    return results


# The backward's hot loops at D = 128 (sm_90, the heuristic's first tile of each dK/dV
# list): the allowances above bound the whole kernel; these bound the innermost MMA loop,
# which runs once per (query block, key block) pair, in the layouts LLM2Vec runs (no softcap)
# and the dense one with EVEN_M: (kind, variant) -> (the most spill stores and loads there,
# the most SASS instructions, ~3% above the count when pinned, so a change that lengthens
# the loop shows). Pinned 28 Nov, after the lse was converted once by the dQ kernel and
# scored with one FFMA: 570 / 564 / 620 / 722 / 698 instructions (from 646 / 643 / 694 / 802
# / 778); EVEN_M's loops 445 and 596, the first with 2 spill stores and 8 loads, where the
# row-masked loop it replaces has 570 and none (ptxas spends the registers the masks freed on
# a schedule that spills a few). tests/test_gpu_triton_compile.py bounds the same loops as
# the GPU machines' Triton builds them.
# dkdv_tma: the list's first TMA tile (q and dO through descriptors bounded to each sequence's span,
# no row or key masks; 28 Nov: 393 / 387 / 387 instructions, no spills).
HOT_LOOPS = {("dkdv", "dense"): (0, 0, 590), ("dkdv", "varlen"): (0, 5, 585), ("dkdv", "mask"): (0, 0, 640),
             ("dkdv", "dense-even"): (2, 8, 460),
             ("dkdv_atomic", "dense"): (0, 0, 745), ("dkdv_atomic", "varlen"): (0, 0, 720),
             ("dkdv_atomic", "dense-even"): (0, 3, 615),
             ("dkdv_tma", "dense"): (0, 0, 405), ("dkdv_tma", "varlen"): (0, 0, 400), ("dkdv_tma", "mask"): (0, 0, 400)}


def _compile_hot() -> list[dict]:
    from helpers import inner_mma_loop

    out = []
    for kind, variant in HOT_LOOPS:
        if kind == "dkdv_tma":  # the dK/dV list's first TMA tile
            c = next(c for c in _kinds()["dkdv"][1](128, False, False, 90) if c.kwargs.get("TMA"))
        else:
            c = _kinds()[kind][1](128, False, False, 90)[0]
        r = _compile_one(kind.removesuffix("_tma"), 128, False, c, 90, False, variant, keep_cubin=True)
        cubin = r.pop("cubin", None)
        r.update(loop=inner_mma_loop(bytes.fromhex(cubin)) if cubin else None, hot=(kind, variant))
        out.append(r)
    return out


def _compile_probes() -> list[dict]:
    """Two dK/dV tiles on sm_90 that check the spill check itself: 32 x 64 on 4 warps at
    BLOCK_D 256 (the list entry before spills were counted: ~1000 STL, STACK > 0, LOCAL 0)
    and the spill-free 32 x 64 on 4 warps at D = 64."""
    from llm2vec_fast.kernels.triton.attention import _cfg

    return [_compile_one("dkdv", 256, False, _cfg(32, 64, 4, 2), 90), _compile_one("dkdv", 64, False, _cfg(32, 64, 4, 2), 90)]


# The DROPOUT=True kernels are separate compilations (the Philox code only exists there):
# their own groups, so pytest -n 2 spreads them too.
GROUPS = [(k, cc, d) for k in ("fwd", "dq", "dkdv") for cc in (90, 80) for d in (False, True)]
# The atomic backward (16-bit, no dropout, BLOCK_D 64 / 128) and its delta pass: no dropout variant.
GROUPS += [(k, cc, False) for k in ("dkdv_atomic", "delta") for cc in (90, 80)]


def test_config_lists_cover_every_head_dim():
    from llm2vec_fast.kernels.triton import attention as tk

    for key in tk.SM80_CONFIGS:  # every sm_80 replacement names a real list
        kind, bd, dropout = key
        assert bd in (tk._DROPOUT_TABLES if dropout else tk._TABLES)[kind], key
    for hd in tk.SUPPORTED_HEAD_DIMS:
        for fp32 in (False, True):
            for dropout in (False, True):
                for chip in tk.CHIPS:
                    for f in (tk.fwd_configs, tk.bwd_dq_configs, tk.bwd_dkdv_configs):
                        assert f(hd, fp32, dropout, chip), f"{f.__name__}({hd}, fp32={fp32}, dropout={dropout}, {chip}) is empty"
                    for kind in ("fwd", "dq", "dkdv"):
                        for cuda in (True, False):
                            for s in (64, 4096):
                                c = tk.heuristic_config(kind, hd, fp32, s, cuda, dropout, chip)
                                if cuda:  # the heuristic picks from the list compiled for that chip
                                    assert str(c) in {str(x) for x in tk._configs(kind, hd, fp32, dropout, chip)}


def test_chip_family(monkeypatch):
    """Compute capability 9+ takes the shared (wgmma) lists, anything older the sm_80 ones."""
    from llm2vec_fast.kernels.triton import attention as tk

    for cap, chip in (((9, 0), 90), ((10, 0), 90), ((8, 0), 80), ((8, 9), 80)):
        tk._chip_of_index.cache_clear()
        monkeypatch.setattr(tk.torch.cuda, "get_device_capability", lambda index, cap=cap: cap)
        assert tk.chip_of(tk.torch.device("cuda", 0)) == chip, cap
    tk._chip_of_index.cache_clear()
    assert tk._configs("dq", 128, False, False, 80) == tk.SM80_CONFIGS["dq", 128, False]
    assert tk._configs("dq", 128, False, False, 90) == tk.BWD_DQ_CONFIGS[128]


def test_spill_check_sees_spills():
    """cuobjdump's LOCAL is 0 for a kernel that spills; the check must see STACK and STL."""
    from helpers import assert_compile_results, run_compile_worker

    spilling, clean = run_compile_worker(__file__, "probe")
    assert spilling["ok"] and clean["ok"], (spilling, clean)
    assert spilling["local"] == 0 and spilling["stack"] > 0 and spilling["stl"] > 100 and spilling["ldl"] > 0, spilling
    assert clean["stack"] == clean["stl"] == clean["ldl"] == clean["local"] == 0, clean
    assert_compile_results([clean], 90)
    with pytest.raises(AssertionError, match="register spills"):
        assert_compile_results([spilling], 90)
    n = spilling["stl"]
    assert_compile_results([spilling], 90, {spilling["case"]: (n, "test")})  # within its allowance
    with pytest.raises(AssertionError, match="over the allowance"):
        assert_compile_results([spilling], 90, {spilling["case"]: (n - 1, "test")})
    with pytest.raises(AssertionError, match="remove its allowance"):
        assert_compile_results([clean], 90, {clean["case"]: (1, "test")})


def test_tma_tiles_compile_to_bulk_copies():
    """The forward's TMA tiles compile to tensor-map bulk copies (``cp.async.bulk.tensor``),
    the pointer tiles to none; a TMA result without them fails the check."""
    from helpers import assert_compile_results, run_compile_worker

    results = run_compile_worker(__file__, "fwd", 90, 0, "d128-bf16-dense-m128n128w8s3")
    by_tma = {r["id"].endswith("-tma-sm90"): r for r in results}
    assert set(by_tma) == {True, False}, [r["id"] for r in results]
    assert by_tma[True]["tma"] is True and "tma" not in by_tma[False]
    assert_compile_results(results, 90)
    with pytest.raises(AssertionError, match="no cp.async.bulk.tensor"):
        assert_compile_results([dict(by_tma[True], tma=False)], 90)


def check_hot_loops(results: list[dict], bounds: dict) -> None:
    """Each hot loop found and within ``bounds[(kind, variant)]`` = (most spill stores, most
    spill loads, most instructions)."""
    assert len(results) == len(bounds)
    for r in results:
        assert r["ok"], r
        loop = r["loop"]
        most_stl, most_ldl, most_n = bounds[tuple(r["hot"])]
        assert loop is not None and loop["n"] > 100, f"{r['id']}: no MMA loop found in the SASS ({loop})"
        assert loop["stl"] <= most_stl and loop["ldl"] <= most_ldl, (
            f"{r['id']}: the inner MMA loop ({loop['n']} instructions) spills: STL={loop['stl']} LDL={loop['ldl']} "
            f"(allowed: {most_stl} / {most_ldl})")
        assert loop["n"] <= most_n, f"{r['id']}: the inner MMA loop grew to {loop['n']} instructions (at most {most_n})"


def test_hot_loops():
    """The dK/dV kernels' innermost loop at D = 128 on sm_90 (HOT_LOOPS), found in the SASS:
    at most the listed spill stores, loads and instructions; its tile is the list's first
    entry."""
    from helpers import run_compile_worker

    check_hot_loops(run_compile_worker(__file__, "hot"), HOT_LOOPS)


@pytest.mark.parametrize("kind,cc,dropout", GROUPS, ids=[f"{k}-sm{cc}{'-dropout' if d else ''}" for k, cc, d in GROUPS])
def test_compile_configs(kind, cc, dropout):
    from helpers import assert_compile_results, run_compile_worker

    assert_compile_results(run_compile_worker(__file__, kind, cc, int(dropout)), cc, _allowances(kind, cc))


if __name__ == "__main__":  # the worker: python tests/test_attention_compile.py KIND CC DROPOUT [ONLY] | probe
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if sys.argv[1] == "probe":
        print(json.dumps(_compile_probes()))
    elif sys.argv[1] == "hot":
        print(json.dumps(_compile_hot()))
    else:
        print(json.dumps(_compile_group(sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3])), *sys.argv[4:5])))

"""Shared test utilities: the tolerance rule, poisoning, and the no-GPU Triton compile check."""
from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, treating equal infinities as equal and NaN as infinite."""
    a, b = a.detach().double(), b.detach().double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = (a - b).abs()
    d = torch.where(same_inf, torch.zeros_like(d), d)
    d = torch.nan_to_num(d, nan=float("inf"))
    return float(d.max()) if d.numel() else 0.0


def assert_close_rule(fast, oracle, ref_native, *, factor=2.0, atol=1e-6, name="output"):
    """STYLE.md's rule: ``max|fast - oracle| <= factor * max|ref_native - oracle| + atol``.

    ``oracle`` is the reference in fp32 (or fp64); ``ref_native`` the same reference run in
    the input dtype, whose error sets the budget. Use factor 2 for outputs, 3 for gradients.
    """
    err = max_err(fast, oracle)
    budget = factor * max_err(ref_native, oracle) + atol
    assert err <= budget, f"{name}: max error {err:.3e} exceeds {factor} x reference error + atol = {budget:.3e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a preallocated output with NaN so an unwritten element cannot pass."""
    return t.fill_(float("nan"))


# --------------------------------------------------------------------------------------
# Compile Triton kernels for sm_90 / sm_80 without a GPU
# --------------------------------------------------------------------------------------

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes per block (H100, A100)


def cuobjdump_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def triton_signature(kernel, constexprs: dict, pointers: dict, floats, elem: str) -> dict:
    """ASTSource signature of ``kernel``: constexprs, pointers (``"*E"`` becomes ``"*" + elem``),
    fp32 scalars named in ``floats``, and i32 for every other argument."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + elem if pointers[name] == "*E" else pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_for(fn, signature: dict, constexprs: dict, cc: int, num_warps: int, num_stages: int, divisible=()):
    """Compile one configuration of a ``@triton.jit`` kernel for compute capability ``cc``.

    ``divisible`` names the arguments a real launch passes as multiples of 16 (aligned
    pointers, LM-sized strides): Triton's launcher specialises those as
    ``tt.divisibility = 16``, and without the hint loads are not vectorised and the
    multi-stage pipeline is not generated, so the figures would describe a kernel that
    never runs. Returns ``dict(ptx=str, shared=int bytes)`` plus :func:`cubin_usage`'s
    register and spill figures of the cubin.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
             if name in set(divisible) and signature[name] != "constexpr"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    return dict(ptx=out.asm["ptx"], shared=int(out.metadata.shared), cubin=out.asm["cubin"], **cubin_usage(out.asm["cubin"]))


# What a compile worker copies from compile_for's figures into each result.
USAGE_KEYS = ("shared", "registers", "local", "stack", "stl", "ldl")


def cubin_usage(cubin: bytes) -> dict:
    """Registers and register spills of a cubin, from ``cuobjdump``.

    Spills do not show in ``--dump-resource-usage``'s ``LOCAL`` (0 for every Triton kernel
    seen, spilling or not): ptxas puts them in the per-thread stack frame (``STACK`` bytes)
    and writes / reads them with ``STL`` / ``LDL`` instructions. So the figures are
    ``registers`` (REG), ``local`` (LOCAL bytes), ``stack`` (STACK bytes) and ``stl`` /
    ``ldl``, the number of spill store / load instructions in the SASS (``cuobjdump -sass``;
    static counts, not executions). The SASS is only disassembled (~0.4 s) when STACK or
    LOCAL is non-zero: with neither, the kernel has no local memory for an STL to write.
    """
    usage = _cuobjdump(cubin, "--dump-resource-usage")

    def most(key):
        return max([int(x) for x in re.findall(rf"\b{key}:(\d+)", usage)] or [0])

    out = dict(registers=most("REG"), local=most("LOCAL"), stack=most("STACK"), stl=0, ldl=0)
    if out["stack"] or out["local"]:
        ops = [op for _, op, _ in _sass_ops(_cuobjdump(cubin, "-sass"))]
        out.update(stl=ops.count("STL"), ldl=ops.count("LDL"))
    return out


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """``cuobjdump FLAG`` of a cubin (through a temporary file)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([cuobjdump_path(), flag, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


# An instruction line: "/*0530*/  STL [R1+0x2b0], R161 ;" (also STL.64, LDL.LU.128, predicated).
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(.*)")


def _sass_ops(sass: str) -> list[tuple[int, str, str]]:
    """``(address, opcode without modifiers, the rest of the line)`` of every SASS instruction."""
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_SASS_LINE.search, sass.splitlines()) if m]


def inner_mma_loop(cubin: bytes) -> dict:
    """The innermost loop of a cubin that issues tensor-core MMAs (``HGMMA`` / ``HMMA``), with
    its spill stores / loads: ``dict(start, end, n, stl, ldl)`` (``n`` instructions), or
    ``None`` when no such loop exists.

    A loop is a backward branch (``BRA`` to a lower address) and its body the instructions
    from the target up to the branch; the innermost MMA loop is the shortest body that holds
    an MMA. That loop runs once per block pair, so a spill there costs on every iteration,
    unlike one around it.
    """
    ops, loops = [], []
    for addr, op, rest in _sass_ops(_cuobjdump(cubin, "-sass")):
        ops.append((addr, op))
        b = re.match(r"\s+(?:\S+\s+)?0x([0-9a-f]+)", rest) if op == "BRA" else None
        if b and int(b.group(1), 16) < addr:
            loops.append((int(b.group(1), 16), addr))
    best = None
    for lo, hi in loops:
        body = [op for a, op in ops if lo <= a <= hi]
        if any(op in ("HGMMA", "HMMA") for op in body) and (best is None or len(body) < best["n"]):
            best = dict(start=lo, end=hi, n=len(body), stl=body.count("STL"), ldl=body.count("LDL"))
    return best


def run_compile_worker(test_file: str, *args, python: str | None = None) -> list[dict]:
    """Run a compile test file as a script (its ``__main__`` worker) and return its JSON results.

    ``python`` is the interpreter that runs it (default: this one); another environment's
    (``test_gpu_triton_compile.py``: the GPU machine's Triton) compiles with that Triton.

    The worker runs without ``TRITON_INTERPRET``: under the interpreter ``@triton.jit`` gives
    objects the GPU compiler cannot take. Each result is a dict with ``id``, ``ok`` and either
    ``error`` or :data:`USAGE_KEYS` (shared memory, registers, spill figures) and ``limit``
    (and, for matmul kernels, ``wgmma`` and ``fp32``; ``case`` where spill allowances apply).
    """
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([python or sys.executable, os.path.abspath(test_file), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=here)
    assert proc.returncode == 0, f"compile worker failed:\n{proc.stderr[-4000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results, "no configuration compiled"
    return results


def spill_text(r: dict) -> str:
    return f"STL={r['stl']} LDL={r['ldl']} STACK={r['stack']} LOCAL={r['local']}"


def assert_compile_results(results: list[dict], cc: int, allow: dict | None = None, spills: bool = True) -> None:
    """Fail on compile errors, register spills, shared memory over the chip's limit, (sm_90,
    results carrying a ``wgmma`` flag, non-fp32) PTX without wgmma, and (results carrying a
    ``tma`` flag: TMA tiles) PTX without tensor bulk copies.

    A spill is any ``STL`` / ``LDL`` in the SASS, a ``STACK`` frame or ``LOCAL`` memory (see
    :func:`cubin_usage`; ``LOCAL`` alone stays 0 when ptxas spills). ``allow`` maps a result's
    ``case`` to ``(max_stl, reason)``: the documented cases where no spill-free configuration
    was found; their configurations may spill up to ``max_stl`` spill stores, so any growth
    fails, and an allowance whose case no longer spills at all fails too (remove it).
    ``spills=False`` checks everything but spills (they are only listed): another Triton's
    build, whose spills the allowances do not describe.
    """
    allow = allow or {}
    bad, worst = [], {}
    for r in results:
        if not r["ok"]:
            bad.append(f"{r['id']}: {r['error']}")
            continue
        spilled = r["stl"] > 0 or r["ldl"] > 0 or r["stack"] > 0 or r["local"] > 0
        case = r.get("case")
        if case in allow:
            worst[case] = max(worst.get(case, 0), r["stl"] + r["ldl"] + r["stack"] + r["local"])
        if spilled and spills:
            if case in allow and r["local"] == 0 and r["stl"] <= allow[case][0]:
                pass  # documented: no spill-free candidate for this case
            elif case in allow:
                bad.append(f"{r['id']}: register spills ({spill_text(r)}) over the allowance for {case} "
                           f"(STL <= {allow[case][0]}, LOCAL 0)")
            else:
                bad.append(f"{r['id']}: register spills ({spill_text(r)})")
        if r["shared"] > r["limit"]:
            bad.append(f"{r['id']}: shared memory {r['shared']} > {r['limit']}")
        if cc == 90 and "wgmma" in r and not r.get("fp32") and not r["wgmma"]:
            bad.append(f"{r['id']}: sm_90 PTX has no wgmma")
        if "tma" in r and not r["tma"]:
            bad.append(f"{r['id']}: a TMA tile whose PTX has no cp.async.bulk.tensor")
    bad += [f"{case}: allowed to spill but no configuration spills now; remove its allowance"
            for case, w in worst.items() if w == 0 and spills]
    summary = "\n".join(f"{r['id']}: regs={r['registers']} smem={r['shared']} {spill_text(r)}"
                        + (" (allowed)" if r.get("case") in allow and r["stl"] else "")
                        for r in results if r["ok"])
    print(summary)  # the per-config figures, shown by pytest -rP / -s
    assert not bad, "\n".join(bad) + "\n--- all ---\n" + summary



@functools.lru_cache(maxsize=1)
def _bench_common():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "common.py")
    spec = importlib.util.spec_from_file_location("_bench_common", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def allocation_peak(fn) -> tuple[int, int]:
    """``benchmarks/common.py``'s :func:`allocation_peak` (CPU allocator events)."""
    return _bench_common().allocation_peak(fn)

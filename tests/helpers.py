"""Shared test utilities: the tolerance rule, poisoning, and the no-GPU Triton compile check."""
from __future__ import annotations

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
    never runs. Returns ``dict(ptx=str, shared=int bytes, registers=int, local=int bytes)``;
    the register and local (spill) figures come from ``cuobjdump --dump-resource-usage``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
             if name in set(divisible) and signature[name] != "constexpr"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(out.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([cuobjdump_path(), "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    reg = [int(x) for x in re.findall(r"REG:(\d+)", usage)]
    local = [int(x) for x in re.findall(r"LOCAL:(\d+)", usage)]
    return dict(ptx=out.asm["ptx"], shared=int(out.metadata.shared), registers=max(reg or [0]), local=max(local or [0]))


def run_compile_worker(test_file: str, *args) -> list[dict]:
    """Run a compile test file as a script (its ``__main__`` worker) and return its JSON results.

    The worker runs without ``TRITON_INTERPRET``: under the interpreter ``@triton.jit`` gives
    objects the GPU compiler cannot take. Each result is a dict with ``id``, ``ok`` and either
    ``error`` or ``shared`` / ``registers`` / ``local`` / ``limit`` (and, for matmul kernels,
    ``wgmma`` and ``fp32``).
    """
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, os.path.abspath(test_file), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=here)
    assert proc.returncode == 0, f"compile worker failed:\n{proc.stderr[-4000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results, "no configuration compiled"
    return results


def assert_compile_results(results: list[dict], cc: int) -> None:
    """Fail on compile errors, register spills, shared memory over the chip's limit, and (sm_90,
    results carrying a ``wgmma`` flag, non-fp32) PTX without wgmma."""
    bad = []
    for r in results:
        if not r["ok"]:
            bad.append(f"{r['id']}: {r['error']}")
            continue
        if r["local"] > 0:
            bad.append(f"{r['id']}: {r['local']} bytes of register spills (LOCAL)")
        if r["shared"] > r["limit"]:
            bad.append(f"{r['id']}: shared memory {r['shared']} > {r['limit']}")
        if cc == 90 and "wgmma" in r and not r.get("fp32") and not r["wgmma"]:
            bad.append(f"{r['id']}: sm_90 PTX has no wgmma")
    summary = "\n".join(f"{r['id']}: regs={r.get('registers')} smem={r.get('shared')}" for r in results if r["ok"])
    assert not bad, "\n".join(bad) + "\n--- all ---\n" + summary

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


def check_compiled(info: dict, cc: int, *, want_wgmma: bool, what: str):
    """Fail on spills, on shared memory over the chip's limit, or on a missing wgmma (sm_90)."""
    assert info["local"] == 0, f"{what} sm_{cc}: {info['local']} bytes of register spills (LOCAL)"
    assert info["shared"] <= SMEM_LIMIT[cc], f"{what} sm_{cc}: shared memory {info['shared']} > {SMEM_LIMIT[cc]}"
    if want_wgmma and cc == 90:
        assert "wgmma" in info["ptx"], f"{what} sm_90: PTX has no wgmma instruction"

"""GPU tests of the Triton attention (marker ``gpu``): bf16 (wrong in the interpreter), the
compiled autotuned kernels, long sequences, torch.compile and determinism.

Tolerance: STYLE.md's rule against the fp32 reference (oracle), budget from the reference
run in bf16 (``upcast=False``): 2x for outputs, 3x for gradients.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_close_rule, max_err

pytestmark = pytest.mark.gpu

DEV = "cuda"


@pytest.fixture(autouse=True)
def _heuristic_configs(monkeypatch):
    # The heuristic's configs (no autotuning) keep the compile count, and so the run, short;
    # test_heuristic_path_matches_autotuned turns the autotuner on and compares the two.
    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "0")


def _ops():
    from llm2vec_fast.ops.attention import flash_attn_noncausal, flash_attn_varlen_noncausal

    return flash_attn_noncausal, flash_attn_varlen_noncausal


def _grads(out, inputs, do):
    return torch.autograd.grad(out, inputs, do)


def _check_padded(B, S, H, Hkv, D, dtype, mask, softcap=0.0):
    from llm2vec_fast.kernels.reference import attention_padded_ref

    padded, _ = _ops()
    q = torch.randn(B, S, H, D, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(B, S, Hkv, D, device=DEV, dtype=dtype, requires_grad=True)
    v = torch.randn(B, S, Hkv, D, device=DEV, dtype=dtype, requires_grad=True)
    scale = 1.0 / math.sqrt(D)
    out, lse = padded(q, k, v, mask, scale, softcap, backend="triton", return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    do = torch.randn_like(out)
    g = _grads(out, (q, k, v), do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    o_or, l_or = attention_padded_ref(q32, k32, v32, mask, scale, softcap, upcast=True, return_lse=True)
    g_or = _grads(o_or, (q32, k32, v32), do.float())
    o_nat, l_nat = attention_padded_ref(q, k, v, mask, scale, softcap, upcast=False, return_lse=True)
    g_nat = _grads(o_nat, (q, k, v), do)
    assert_close_rule(out, o_or, o_nat, atol=1e-3, name="out")
    assert_close_rule(lse, l_or, l_nat, atol=1e-3, name="lse")
    for n, a, b, c in zip("qkv", g, g_or, g_nat):
        assert_close_rule(a, b, c, factor=3.0, atol=1e-3, name=f"d{n}")


@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
def test_bf16_padded_head_dims(D):
    B, S = 3, 333
    mask = torch.rand(B, S, device=DEV) > 0.3
    mask[1, 200:] = False
    _check_padded(B, S, 8, 2, D, torch.bfloat16, mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_unpadded_gqa(dtype):
    _check_padded(1, 2048 + 17, 8, 1, 128, dtype, None)


def test_bf16_right_left_padding_softcap():
    B, S = 4, 700
    lens = torch.tensor([700, 1, 350, 0], device=DEV)
    pos = torch.arange(S, device=DEV)[None]
    mask = pos < lens[:, None]
    mask[2] = pos[0] >= S - 350  # left padding
    _check_padded(B, S, 4, 4, 64, torch.bfloat16, mask, softcap=20.0)


def test_bf16_varlen_matches_padded():
    padded, varlen = _ops()
    lens = [1, 17, 97, 130, 0, 1000]
    B, S, H, Hkv, D = len(lens), max(lens), 8, 2, 128
    mask = torch.arange(S, device=DEV)[None] < torch.tensor(lens, device=DEV)[:, None]
    q = torch.randn(B, S, H, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(B, S, Hkv, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, D, device=DEV, dtype=torch.bfloat16)
    idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=DEV)
    cu[1:] = torch.cumsum(torch.tensor(lens, device=DEV), 0)
    o_p = padded(q, k, v, mask, backend="triton")
    o_v = varlen(*(t.reshape(B * S, -1, D)[idx] for t in (q, k, v)), cu, cu, S, S, backend="triton")
    assert max_err(o_p.reshape(B * S, H, D)[idx], o_v) <= 1e-2
    assert (o_p.reshape(B * S, H, D)[~mask.reshape(-1)] == 0).all()


def test_deterministic_backward():
    padded, _ = _ops()
    q = torch.randn(2, 1024, 16, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 1024, 2, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 1024, 2, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    g1 = _grads(padded(q, k, v, backend="triton", deterministic=True), (q, k, v), do)
    g2 = _grads(padded(q, k, v, backend="triton", deterministic=True), (q, k, v), do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_torch_compile_no_graph_break():
    padded, _ = _ops()

    def f(q, k, v, m):
        return padded(q, k, v, m, backend="triton").float().sum()

    q = torch.randn(2, 128, 4, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 128, 4, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 128, 4, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    m = torch.ones(2, 128, dtype=torch.bool, device=DEV)
    m[1, 100:] = False
    cf = torch.compile(f, fullgraph=True)
    loss = cf(q, k, v, m)
    loss.backward()
    ref = f(q, k, v, m)
    assert torch.allclose(loss, ref, rtol=1e-3)


def test_heuristic_path_matches_autotuned(monkeypatch):
    padded, _ = _ops()
    q = torch.randn(2, 1000, 8, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(2, 1000, 8, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(2, 1000, 8, 128, device=DEV, dtype=torch.bfloat16)
    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "1")
    a = padded(q, k, v, backend="triton")
    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "0")
    b = padded(q, k, v, backend="triton")
    assert max_err(a, b) <= 2e-2

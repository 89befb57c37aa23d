"""GPU tests of the pooling / InfoNCE kernels: Triton and CUDA C++ backends, bf16 included.

Same tolerance rule as the interpreter tests (STYLE.md): the oracle is the reference on fp64
inputs, the budget twice (outputs) or three times (gradients) the error of the reference
run in the input dtype. Sizes are LLM-like but small enough for seconds: ragged hidden sizes
(C = 1000), T = 300 with padding and instruction masks, B up to 1000 for the loss, and one
> 2^31-element hidden tensor to check 64-bit offsets. The CUDA backend JIT-builds csrc/ on
first use (``cuda_ext_available``); a failed build fails ``test_cuda_extension_builds``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_rule, max_err

import llm2vec_fast as L
from llm2vec_fast.kernels import reference as ref

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}
MODES = ("mean", "weighted_mean", "last_token", "bos_token")


def _toolchain_missing():
    """Why a JIT build cannot even start here (no ninja / nvcc), else None: then skip, not fail."""
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    from llm2vec_fast.kernels import cuda as ck

    if ck.HAS_CUDA_EXT:
        return None
    if not is_ninja_available():
        return "ninja not installed (pip install ninja) and no prebuilt llm2vec_fast._C"
    if CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) found and no prebuilt llm2vec_fast._C"
    return None


def _need(backend):
    if backend == "cuda":
        from llm2vec_fast.kernels import cuda as ck

        why = _toolchain_missing()
        if why:
            pytest.skip(why)
        if not ck.cuda_ext_available():
            pytest.fail(f"CUDA extension unavailable: {ck.cuda_ext_error()}")


def test_cuda_extension_builds():
    """JIT-builds csrc/ (or finds the prebuilt _C); a compile or link error fails here."""
    _need("cuda")


def _case(layout, B, T, C, dtype, empty_row=False):
    dev = "cuda"
    if layout == "padded":
        h = torch.randn(B, T, C, device=dev, dtype=dtype)
        lens = torch.randint(1, T + 1, (B,), device=dev)
        ar = torch.arange(T, device=dev)
        attn = ar[None] < lens[:, None]
        attn[0] = ar >= T // 3  # one left-padded row
        embed = ar[None] >= torch.randint(0, 8, (B, 1), device=dev)  # instruction prefixes
        if empty_row:
            embed[1] = False  # an empty region: the zero vector
        return h, attn, embed, None
    lens = torch.randint(1, T + 1, (B,))
    if empty_row:
        lens[1] = 0
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    h = torch.randn(int(cu[-1]), C, device=dev, dtype=dtype)
    embed = torch.rand(h.shape[0], device=dev) > 0.2
    return h, None, embed, cu.to(dev)


# bf16 (GPU-only) in every mode and layout; fp16 / fp32 on a few (they share the code paths).
POOL_CASES = [(m, lay, torch.bfloat16) for m in MODES for lay in ("padded", "packed")] + [
    ("mean", "padded", torch.float16), ("weighted_mean", "packed", torch.float16),
    ("mean", "packed", torch.float32), ("last_token", "padded", torch.float32),
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mode,layout,dtype", POOL_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_pool_gpu(mode, layout, dtype, backend):
    _need(backend)
    B, T, C = 33, 300, 1000
    # Both paths. F.normalize's backward at a zero vector divides by eps (1e-12), which an fp16
    # reference turns into inf * 0 = NaN (a vacuous budget): empty rows only without normalising.
    normalize = mode != "mean"
    h, attn, embed, cu = _case(layout, B, T, C, dtype, empty_row=not normalize)
    h64 = h.detach().double().requires_grad_()
    hn = h.detach().clone().requires_grad_()
    hf = h.detach().clone().requires_grad_()

    def refp(x, upcast):
        o = ref.pool_ref(x, attn, embed, mode, cu_seqlens=cu, upcast=upcast)
        if normalize:  # as the torch backend of pool(): normalise in fp32 (fp64 oracle), cast back
            o = F.normalize(o if o.dtype == torch.float64 else o.float(), dim=-1).to(o.dtype)
        return o

    oracle, native = refp(h64, True), refp(hn, False)
    fast = L.pool(hf, attn, embed, mode, cu_seqlens=cu, normalize=normalize, backend=backend)
    assert fast.dtype == dtype
    assert_close_rule(fast, oracle, native, atol=ATOL[dtype], name=f"{backend} pooled")
    g = torch.randn(B, C, device="cuda", dtype=torch.float64)
    (d64,) = torch.autograd.grad(oracle, h64, g)
    (dn,) = torch.autograd.grad(native, hn, g.to(dtype))
    (df,) = torch.autograd.grad(fast, hf, g.to(dtype))
    assert torch.isfinite(df).all()
    assert_close_rule(df, d64, dn, factor=3.0, atol=ATOL[dtype], name=f"{backend} d hidden")


def _token_rows(h, cu, texts):
    """Bool over hidden's first dim: the rows (padded) or tokens (packed) of ``texts``."""
    if cu is None:
        ids = torch.arange(h.shape[0], device=h.device)
    else:
        ids = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=h.device), (cu[1:] - cu[:-1]).long())
    return torch.isin(ids, torch.tensor(sorted(texts), device=h.device))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_pool_normalize_eps_rows_gpu(layout, mode):
    """bf16 normalised pooling (Triton: the normalisation fused into the pooling kernels) with
    pooled vectors of norm < eps: an all-zero text, one scaled by 1e-15 and an empty region
    (last texts, so the packed reference's gathers never read their huge gradients). Their
    d hidden is ~1e12 (F.normalize divides by eps; finite in bf16), so the rule is applied to
    them and to the other texts separately."""
    B, T, C, dtype = 33, 300, 1000, torch.bfloat16
    h, attn, embed, cu = _case(layout, B, T, C, torch.float32)
    if layout == "padded":
        embed[:, -1] = True
        attn[:, -1] = True  # every text pools at least its last token ...
        embed[B - 1] = False  # ... but the last: an empty region
    else:
        embed[cu[:-1].long().clamp(max=h.shape[0] - 1)] = True
        embed[cu[B - 1]:] = False
    h[_token_rows(h, cu, {B - 3})] = 0.0
    h[_token_rows(h, cu, {B - 2})] *= 1e-15
    h = h.to(dtype)
    eps_texts = {B - 3, B - 2, B - 1}
    h64 = h.detach().double().requires_grad_()
    hn = h.detach().clone().requires_grad_()
    hf = h.detach().clone().requires_grad_()
    p64 = ref.pool_ref(h64, attn, embed, mode, cu_seqlens=cu)
    assert set((p64.detach().norm(dim=1) < 1e-12).nonzero().flatten().tolist()) == eps_texts
    oracle = F.normalize(p64, dim=-1)
    native = F.normalize(ref.pool_ref(hn, attn, embed, mode, cu_seqlens=cu, upcast=False).float(), dim=-1).to(dtype)
    fast = L.pool(hf, attn, embed, mode, cu_seqlens=cu, normalize=True, backend="triton")
    assert fast.dtype == dtype
    assert_close_rule(fast, oracle, native, atol=ATOL[dtype], name="normalised")
    g = torch.randn(B, C, device="cuda", dtype=torch.float64)
    (d64,) = torch.autograd.grad(oracle, h64, g)
    (dn,) = torch.autograd.grad(native, hn, g.to(dtype))
    (df,) = torch.autograd.grad(fast, hf, g.to(dtype))
    rows = _token_rows(h, cu, eps_texts)
    for sel, name in ((~rows, "d hidden"), (rows, "d hidden (norm < eps)")):
        assert torch.isfinite(dn[sel]).all() and torch.isfinite(df[sel]).all()
        assert_close_rule(df[sel], d64[sel], dn[sel], factor=3.0, atol=ATOL[dtype], name=name)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pooling,M,symmetric", [("mean", 0, False), ("mean", 64, True), ("last_token", 32, False)])
def test_pooled_info_nce_gpu(pooling, M, symmetric, dtype, backend):
    _need(backend)
    B, T, C = 96, 128, 1000
    parts = [_case("padded", n, T, C, dtype) for n in (B, B, M) if n]
    hs64 = [p[0].detach().double().requires_grad_() for p in parts]
    hsn = [p[0].detach().clone().requires_grad_() for p in parts]
    hsf = [p[0].detach().clone().requires_grad_() for p in parts]

    def call(fn, hs, **kw):
        neg = len(parts) == 3
        return fn(hs[0], parts[0][1], hs[1], parts[1][1], embed_mask_q=parts[0][2], embed_mask_d=parts[1][2],
                  hidden_neg=hs[2] if neg else None, mask_neg=parts[2][1] if neg else None,
                  embed_mask_neg=parts[2][2] if neg else None, temperature=0.05, pooling=pooling,
                  symmetric=symmetric, **kw)

    oracle = call(ref.pooled_info_nce_ref, hs64)
    e = [ref.pool_ref(h, p[1], p[2], pooling, upcast=False) for h, p in zip(hsn, parts)]
    native = ref.info_nce_ref(e[0], e[1], e[2] if len(e) == 3 else None, temperature=0.05, symmetric=symmetric)
    fast = call(L.pooled_info_nce, hsf, backend=backend)
    assert_close_rule(fast, oracle, native, atol=1e-5, name=f"{backend} loss")
    for x, y, z in zip(torch.autograd.grad(fast, hsf), torch.autograd.grad(oracle, hs64),
                       torch.autograd.grad(native, hsn)):
        assert x.dtype == dtype
        assert_close_rule(x, y, z, factor=3.0, atol=ATOL[dtype], name=f"{backend} d hidden")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_gpu(symmetric, dtype):
    B, M, C = 1000, 500, 256
    args = [torch.randn(n, C, device="cuda", dtype=dtype) for n in (B, B, M)]
    a64 = [t.double().requires_grad_() for t in args]
    an = [t.clone().requires_grad_() for t in args]
    af = [t.clone().requires_grad_() for t in args]
    oracle = ref.info_nce_ref(*a64, temperature=0.05, symmetric=symmetric)
    native = ref.info_nce_ref(*an, temperature=0.05, symmetric=symmetric)
    fast = L.info_nce(*af, temperature=0.05, symmetric=symmetric, backend="triton")
    assert_close_rule(fast, oracle, native, atol=1e-5, name="loss")
    for x, y, z in zip(torch.autograd.grad(fast, af), torch.autograd.grad(oracle, a64), torch.autograd.grad(native, an)):
        assert_close_rule(x, y, z, factor=3.0, atol=ATOL[dtype], name="d emb")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_pool_64bit_offsets(backend):
    """A (1100, 1024, 2048) bf16 hidden tensor has 2.3e9 > 2^31 elements: the last rows must be right."""
    _need(backend)
    B, T, C = 1100, 1024, 2048
    h = torch.empty(B, T, C, device="cuda", dtype=torch.bfloat16).normal_()
    attn = torch.ones(B, T, dtype=torch.bool, device="cuda")
    attn[:, 700:] = False
    h.requires_grad_()
    out = L.pool(h, attn, None, "mean", backend=backend)
    tail = slice(B - 3, B)
    want = ref.pool_ref(h[tail].detach().double(), attn[tail], None, "mean")
    assert max_err(out[tail], want) < 1e-2
    g = torch.zeros_like(out)
    g[-1] = 1
    (d,) = torch.autograd.grad(out, h, g)
    assert float(d[-1, :700].float().sub(1.0 / 700).abs().max()) < 1e-4
    assert float(d[-1, 700:].float().abs().max()) == 0.0
    del d, h
    torch.cuda.empty_cache()

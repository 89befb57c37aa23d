"""Triton pooling / InfoNCE kernels against the fp64 reference (interpreter on CPU, compiled on GPU).

Tolerance (STYLE.md): ``|fast - oracle| <= 2 x |ref_native - oracle| + atol`` for outputs and
3x for gradients, where the oracle is the reference on fp64 inputs and ``ref_native`` the
reference computed in the input dtype (``pool_ref(upcast=False)``; the loss itself is fp32
in every implementation). Odd shapes (B = 1, 3, 5; T = 1, 17, 19; C = 48, 80, 200 so the
channel blocks are ragged), left and right padding, instruction (embed) masks, rows with an
empty region, packed input with an empty sequence.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from helpers import assert_close_rule, max_err, poison_  # noqa: E402

import llm2vec_fast as L  # noqa: E402
from llm2vec_fast.kernels import reference as ref  # noqa: E402

pytestmark = pytest.mark.interpreter

ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}
MODES = ("mean", "weighted_mean", "last_token", "bos_token")


def _tk():
    from llm2vec_fast.kernels.triton import info_nce as tk

    return tk


def _padded_masks(B, T, device, empty_row):
    attn = (torch.rand(B, T, device=device) > 0.25).long()
    attn[0, : T // 3] = 0  # left padding
    attn[0, T // 3 :] = 1
    if B > 1:
        attn[1, T - T // 4 :] = 0  # right padding
        attn[1, : T - T // 4] = 1
    embed = torch.ones(B, T, dtype=torch.bool, device=device)
    embed[-1, : T // 2] = False  # instruction tokens at the start of the last text
    if empty_row and B > 2:
        embed[2] = False  # nothing to pool: the zero vector
    return attn, embed


def _packed(B, C, dtype, device, empty_row, max_len=20):
    lens = torch.randint(1, max_len + 1, (B,))
    if empty_row and B > 1:
        lens[1] = 0
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    total = int(cu[-1])
    h = torch.randn(total, C, device=device, dtype=dtype)
    embed = torch.rand(total, device=device) > 0.2
    return h, cu.to(device), embed


def _pool_case(layout, B, T, C, dtype, device, empty_row):
    if layout == "padded":
        h = torch.randn(B, T, C, device=device, dtype=dtype)
        attn, embed = _padded_masks(B, T, device, empty_row)
        return h, attn, embed, None
    h, cu, embed = _packed(B, C, dtype, device, empty_row, max_len=T)
    return h, None, embed, cu


def _ref_pool(h, attn, embed, mode, cu, normalize, upcast):
    out = ref.pool_ref(h, attn, embed, mode, cu_seqlens=cu, upcast=upcast)
    return F.normalize(out, dim=-1) if normalize else out


# --------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("mode", MODES + ("eos_token",))
@pytest.mark.parametrize("normalize", [False, True])
def test_pool_matches_reference(mode, layout, dtype, normalize, device):
    B, T, C = 5, 45, 200  # 45 tokens = two 32-token tiles; 200 channels = a full and a ragged 128-block
    # F.normalize's backward at the zero vector divides by eps (1e-12): fp16 references turn
    # that into NaN, so the empty-row cases run without normalisation.
    h, attn, embed, cu = _pool_case(layout, B, T, C, dtype, device, empty_row=not normalize)
    h64 = h.detach().double().requires_grad_()
    hn = h.detach().clone().requires_grad_()
    hf = h.detach().clone().requires_grad_()
    oracle = _ref_pool(h64, attn, embed, mode, cu, normalize, True)
    native = _ref_pool(hn, attn, embed, mode, cu, normalize, False)
    fast = L.pool(hf, attn, embed, mode, cu_seqlens=cu, normalize=normalize, backend="triton")
    assert fast.dtype == dtype and fast.shape == (B, C)
    assert_close_rule(fast, oracle, native, atol=ATOL[dtype], name="pooled")
    g = torch.randn(B, C, device=device, dtype=torch.float64)
    (d64,) = torch.autograd.grad(oracle, h64, g)
    (dn,) = torch.autograd.grad(native, hn, g.to(dtype))
    (df,) = torch.autograd.grad(fast, hf, g.to(dtype))
    assert df.dtype == dtype and df.shape == h.shape
    assert_close_rule(df, d64, dn, factor=3.0, atol=ATOL[dtype], name="d hidden")


@pytest.mark.parametrize("T", [1, 17])
def test_pool_tiny_and_single_token(T, device):
    """T = 1 (one token), C = 48 (a 64-wide block, 16 lanes masked), B = 1."""
    h = torch.randn(1, T, 48, device=device, requires_grad=True)
    attn = torch.ones(1, T, dtype=torch.bool, device=device)
    for mode in MODES:
        out = L.pool(h, attn, None, mode, backend="triton")
        want = ref.pool_ref(h.double(), attn, None, mode)
        assert max_err(out, want) < 1e-5
        (d,) = torch.autograd.grad(out.sum(), h)
        (dw,) = torch.autograd.grad(ref.pool_ref(h, attn, None, mode).sum(), h)
        assert max_err(d, dw) < 1e-6


def test_pool_strided_hidden(device):
    """A non-contiguous (B, T, C) view (every other token) is read through its strides."""
    base = torch.randn(3, 34, 80, device=device)
    h = base[:, ::2]
    attn = torch.rand(3, 17, device=device) > 0.3
    out = L.pool(h, attn, None, "weighted_mean", backend="triton")
    assert max_err(out, ref.pool_ref(h.double(), attn, None, "weighted_mean")) < 1e-5


def test_pool_kernels_write_every_element(device):
    """NaN-poisoned outputs: the forward writes all of E and the backward all of d hidden."""
    tk = _tk()
    B, T, C = 3, 17, 80
    h = torch.randn(B, T, C, device=device)
    attn, embed = _padded_masks(B, T, device, empty_row=True)
    region = tk._region(h, attn, embed, None)
    for mode in MODES:
        E = poison_(torch.empty(B, C, device=device))
        _, ssq, den, sel = tk.pool_forward(h, region, None, mode, out=E)
        assert torch.isfinite(E).all() and torch.isfinite(ssq).all()
        assert max_err(E, ref.pool_ref(h.double(), attn, embed, mode)) < 1e-5
        assert max_err(ssq, (E.double() ** 2).sum(1)) < 1e-4
        dh = poison_(torch.empty(B, T, C, device=device))
        tk.pool_backward(torch.randn(B, C, device=device), h.shape, h.dtype, region, None, den, sel, mode, dh=dh)
        assert torch.isfinite(dh).all()
        assert (dh[~(attn.bool() & embed)] == 0).all()


# --------------------------------------------------------------------------------------
# InfoNCE on embeddings (the softmax-CE kernels)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,M", [(1, 0), (7, 3), (150, 150)])  # 300 columns: two 256-wide tiles
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_info_nce_matches_reference(B, M, symmetric, dtype, device):
    C = 40
    q, d = (torch.randn(B, C, device=device, dtype=dtype) for _ in range(2))
    n = torch.randn(M, C, device=device, dtype=dtype) if M else None
    args = [q, d] + ([n] if M else [])
    a64 = [t.detach().double().requires_grad_() for t in args]
    af = [t.detach().clone().requires_grad_() for t in args]
    an = [t.detach().clone().requires_grad_() for t in args]

    def split(a):
        return a[0], a[1], (a[2] if M else None)

    oracle = ref.info_nce_ref(*split(a64), temperature=0.05, symmetric=symmetric)
    native = ref.info_nce_ref(*split(an), temperature=0.05, symmetric=symmetric)
    fast = L.info_nce(*split(af), temperature=0.05, symmetric=symmetric, backend="triton")
    assert fast.dtype == torch.float32 and fast.dim() == 0
    assert_close_rule(fast, oracle, native, atol=1e-5, name="loss")
    g64 = torch.autograd.grad(oracle, a64)
    gn = torch.autograd.grad(native, an)
    gf = torch.autograd.grad(fast, af)
    for name, x, y, z in zip(("dq", "dd", "dneg"), gf, g64, gn):
        assert x.dtype == dtype
        assert_close_rule(x, y, z, factor=3.0, atol=ATOL[dtype], name=name)


def test_ce_kernels_write_every_element(device):
    tk = _tk()
    B, N = 37, 300
    S = torch.randn(B, N, device=device)
    loss, lse_r, lse_c = tk.ce_forward(S, B, 20.0, True)
    want = torch.logsumexp(S * 20.0, 1)
    assert max_err(lse_r, want) < 1e-4
    assert max_err(lse_c, torch.logsumexp(S[:, :B].t() * 20.0, 1)) < 1e-4
    dS = tk.ce_backward(torch.tensor(1.0, device=device), S, lse_r, lse_c, 20.0, True)
    assert torch.isfinite(dS).all() and dS.shape == S.shape


# --------------------------------------------------------------------------------------
# Pooled InfoNCE
# --------------------------------------------------------------------------------------


def _pooled_inputs(layout, B, M, T, C, dtype, device):
    inputs = {}
    for part, n in (("q", B), ("d", B), ("neg", M)):
        if part == "neg" and not M:
            continue
        h, attn, embed, cu = _pool_case(layout, n, T + (2 if part == "d" else 0), C, dtype, device, empty_row=False)
        inputs[part] = (h, attn, embed if part != "d" else None, cu)
    return inputs


def _call(fn, inputs, hiddens, **kw):
    q, d = inputs["q"], inputs["d"]
    neg = inputs.get("neg")
    return fn(
        hiddens[0], q[1], hiddens[1], d[1], embed_mask_q=q[2], embed_mask_d=d[2],
        hidden_neg=hiddens[2] if neg else None, mask_neg=neg[1] if neg else None,
        embed_mask_neg=neg[2] if neg else None, cu_seqlens_q=q[3], cu_seqlens_d=d[3],
        cu_seqlens_neg=neg[3] if neg else None, **kw,
    )


def _native_pooled(inputs, hiddens, pooling, symmetric):
    """The reference with pooling in the input dtype (its own rounding sets the budget)."""
    e = {}
    for i, part in enumerate(("q", "d", "neg")):
        if part in inputs:
            _, attn, embed, cu = inputs[part]
            e[part] = ref.pool_ref(hiddens[i], attn, embed, pooling, cu_seqlens=cu, upcast=False)
    return ref.info_nce_ref(e["q"], e["d"], e.get("neg"), temperature=0.05, symmetric=symmetric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize(
    "pooling,M,symmetric",
    [("mean", 0, False), ("mean", 4, True), ("weighted_mean", 3, False), ("last_token", 0, True),
     ("bos_token", 2, False), ("eos_token", 5, True)],
)
def test_pooled_info_nce_matches_reference(pooling, M, symmetric, layout, dtype, device):
    B, T, C = 5, 17, 80
    inputs = _pooled_inputs(layout, B, M, T, C, dtype, device)
    parts = [p for p in ("q", "d", "neg") if p in inputs]
    h64 = [inputs[p][0].detach().double().requires_grad_() for p in parts] + [None] * (3 - len(parts))
    hn = [inputs[p][0].detach().clone().requires_grad_() for p in parts] + [None] * (3 - len(parts))
    hf = [inputs[p][0].detach().clone().requires_grad_() for p in parts] + [None] * (3 - len(parts))
    oracle = _call(ref.pooled_info_nce_ref, inputs, h64, temperature=0.05, pooling=pooling, symmetric=symmetric)
    native = _native_pooled(inputs, hn, pooling, symmetric)
    fast = _call(L.pooled_info_nce, inputs, hf, temperature=0.05, pooling=pooling, symmetric=symmetric,
                 backend="triton")
    assert fast.dtype == torch.float32 and fast.dim() == 0
    assert_close_rule(fast, oracle, native, atol=1e-5, name="loss")
    n = len(parts)
    g64 = torch.autograd.grad(oracle, h64[:n])
    gn = torch.autograd.grad(native, hn[:n])
    gf = torch.autograd.grad(fast, hf[:n])
    for p, x, y, z in zip(parts, gf, g64, gn):
        assert x.dtype == dtype and x.shape == inputs[p][0].shape
        assert_close_rule(x, y, z, factor=3.0, atol=ATOL[dtype], name=f"d hidden_{p}")


def test_pooled_info_nce_cross_rank_without_group_is_local(device):
    """cross_rank=True with no process group: the fast pooling + reference loss, same value."""
    inputs = _pooled_inputs("padded", 3, 2, 9, 48, torch.float32, device)
    hs = [inputs[p][0] for p in ("q", "d", "neg")]
    a = _call(L.pooled_info_nce, inputs, hs, cross_rank=True, backend="triton")
    b = _call(L.pooled_info_nce, inputs, hs, cross_rank=False, backend="triton")
    assert max_err(a, b) < 1e-5


# --------------------------------------------------------------------------------------
# Property test and bad input
# --------------------------------------------------------------------------------------


def test_pool_property(device):
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=12, deadline=None, derandomize=True)
    @hyp.given(B=st.integers(1, 4), T=st.integers(1, 40), C=st.integers(1, 150), mode=st.sampled_from(MODES),
               seed=st.integers(0, 2**16))
    def check(B, T, C, mode, seed):
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(B, T, C, generator=g).to(device)
        attn = (torch.rand(B, T, generator=g) > 0.4).to(device)
        embed = (torch.rand(B, T, generator=g) > 0.2).to(device)
        out = L.pool(h, attn, embed, mode, backend="triton")
        assert max_err(out, ref.pool_ref(h.double(), attn, embed, mode)) < 1e-5

    check()


def test_bad_input_raises_before_any_kernel(device):
    h = torch.randn(2, 5, 16, device=device)
    attn = torch.ones(2, 5, device=device)
    with pytest.raises(ValueError, match="mode"):
        L.pool(h, attn, None, "max", backend="triton")
    with pytest.raises(ValueError, match="attention_mask"):
        L.pool(h, torch.ones(2, 4, device=device), None, "mean", backend="triton")
    with pytest.raises(ValueError, match="embed_mask"):
        L.pool(h, attn, torch.ones(2, 6, device=device), "mean", backend="triton")
    with pytest.raises(ValueError, match="cu_seqlens"):
        L.pool(h[0], None, None, "mean", cu_seqlens=torch.tensor([0, 5], device=device), backend="triton")
    with pytest.raises(ValueError, match="temperature"):
        L.info_nce(h[:, 0], h[:, 1], temperature=0.0, backend="triton")
    with pytest.raises(ValueError, match="emb_d"):
        L.info_nce(h[:, 0], h[:1, 1], backend="triton")
    with pytest.raises(ValueError, match="hidden_d"):
        L.pooled_info_nce(h, attn, h[:1], attn[:1], backend="triton")
    with pytest.raises(ValueError, match="backend"):
        L.pool(h, attn, None, "mean", backend="cutlass")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_cuda_backend_on_cpu_tensors_is_refused():
    h = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="CUDA"):
        L.pool(h, torch.ones(2, 5), None, "mean", backend="cuda")

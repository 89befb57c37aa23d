"""Triton pooling / InfoNCE kernels against the fp64 reference (interpreter on CPU, compiled on GPU).

Tolerance (STYLE.md): ``|fast - oracle| <= 2 x |ref_native - oracle| + atol`` for outputs and
3x for gradients, where the oracle is the reference on fp64 inputs and ``ref_native`` the
reference computed in the input dtype (``pool_ref(upcast=False)``; the loss itself is fp32
in every implementation). Odd shapes (B = 1, 3, 5; T = 1, 17, 19; C = 48, 80, 200 so the
channel blocks are ragged), left and right padding, instruction (embed) masks, rows with an
empty region, packed input with an empty sequence. The L2 normalisation (fused into the
pooling kernels, and on raw embeddings) is also checked where F.normalize divides by eps:
pooled vectors that are zero or have a norm below 1e-12.
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


@pytest.mark.parametrize("normalize", [False, True])
def test_pool_kernels_write_every_element(normalize, device):
    """NaN-poisoned outputs: the forward writes all of E and the backward all of d hidden."""
    tk = _tk()
    B, T, C = 3, 17, 80
    h = torch.randn(B, T, C, device=device)
    attn, embed = _padded_masks(B, T, device, empty_row=True)
    region = tk._region(h, attn, embed, None)
    for mode in MODES:
        E = poison_(torch.empty(B, C, device=device))
        _, nrm, den, sel = tk.pool_forward(h, region, None, mode, out=E, normalize=normalize)
        assert torch.isfinite(E).all()
        want = ref.pool_ref(h.double(), attn, embed, mode)
        if normalize:
            assert max_err(nrm, want.norm(dim=1)) < 1e-5
            want = F.normalize(want, dim=-1)
        else:
            assert nrm is None
        assert max_err(E, want) < 1e-5
        dh = poison_(torch.empty(B, T, C, device=device))
        tk.pool_backward(torch.randn(B, C, device=device), h.shape, h.dtype, region, None, den, sel, mode, dh=dh,
                         en=E if normalize else None, nrm=nrm)
        assert torch.isfinite(dh).all()
        assert (dh[~(attn.bool() & embed)] == 0).all()


# --------------------------------------------------------------------------------------
# L2 normalisation (pooled and on embeddings), the eps branch included
# --------------------------------------------------------------------------------------


def _rows_of(h, cu, texts):
    """Bool over d hidden's first dim: True on the tokens (padded: the rows) of ``texts``."""
    if cu is None:
        ids = torch.arange(h.shape[0])
    else:
        lens = (cu[1:] - cu[:-1]).long().cpu()
        ids = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    return torch.isin(ids, torch.tensor(sorted(texts), dtype=torch.long)).to(h.device)


def _assert_grad_split(df, d64, dn, rows, dtype, name):
    """STYLE.md's gradient rule, separately on rows whose pooled vector has a norm below eps
    (``rows``) and on the others, so the ~1e12 gradients of the former (F.normalize divides
    by eps there) cannot hide the errors of the latter. In fp16 1e12 overflows: the eps rows
    must then equal the fp64 oracle rounded to fp16 (+-inf on the region, 0 off it)."""
    assert torch.isfinite(dn[~rows]).all(), "the reference's own gradient is not finite: the budget is vacuous"
    assert_close_rule(df[~rows], d64[~rows], dn[~rows], factor=3.0, atol=ATOL[dtype], name=name)
    if dtype == torch.float32:
        assert_close_rule(df[rows], d64[rows], dn[rows], factor=3.0, atol=ATOL[dtype], name=f"{name} (norm < eps)")
    else:
        torch.testing.assert_close(df[rows].double(), d64[rows].to(dtype).double(), rtol=1e-2, atol=0)


def _eps_case(layout, C, dtype, device):
    """Six texts, three of them pooling to a vector of norm < eps: one with all-zero hidden
    states, one scaled by 1e-15 (0 < norm < eps in fp32; underflows to zero in fp16) and one
    with an empty region. Packed puts them last: the packed reference gathers each text's
    padding positions from the following texts, so an inf (fp16) there would reach them.
    Returns ``(h, attn, embed, cu, eps_texts)``."""
    B, T = 6, 19
    if layout == "padded":
        h = torch.randn(B, T, C, device=device)
        attn, embed = _padded_masks(B, T, device, empty_row=True)  # text 2: empty region
        zero, tiny, eps_texts = 0, 1, {0, 1, 2}
        embed[3:, -1] = True  # the ordinary texts pool at least one token
        attn[3:, -1] = 1
        cu = None
    else:
        lens = torch.tensor([7, 19, 1, 5, 12, 0])  # text 5: empty
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = lens.cumsum(0)
        h = torch.randn(int(cu[-1]), C, device=device)
        embed = torch.rand(h.shape[0], device=device) > 0.2
        embed[cu[:3].long()] = True
        attn, zero, tiny, eps_texts = None, 3, 4, {3, 4, 5}
        cu = cu.to(device)
    rows = _rows_of(h, cu, {zero}), _rows_of(h, cu, {tiny})
    h[rows[0]] = 0.0
    h[rows[1]] *= 1e-15
    return h.to(dtype), attn, embed, cu, eps_texts


def _native_normalized(h, attn, embed, mode, cu):
    """The reference in the input dtype, normalised in fp32 and cast back, as the torch
    backend of ``pool(normalize=True)`` does (F.normalize in fp16 turns eps into 0)."""
    p = ref.pool_ref(h, attn, embed, mode, cu_seqlens=cu, upcast=False)
    return F.normalize(p.float(), dim=-1).to(p.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("mode", MODES + ("eos_token",))
@pytest.mark.parametrize("C", [48, 200])
def test_pool_normalize_eps_rows(C, mode, layout, dtype, device):
    """Normalised pooling where some pooled vectors are zero or below eps, in every mode."""
    h, attn, embed, cu, eps_texts = _eps_case(layout, C, dtype, device)
    h64 = h.detach().double().requires_grad_()
    hn = h.detach().clone().requires_grad_()
    hf = h.detach().clone().requires_grad_()
    oracle = _ref_pool(h64, attn, embed, mode, cu, True, True)
    pooled64 = ref.pool_ref(h64.detach(), attn, embed, mode, cu_seqlens=cu)
    small = (pooled64.norm(dim=1) < 1e-12).nonzero().flatten().tolist()
    assert set(small) == eps_texts, small  # the case is what it claims to be
    native = _native_normalized(hn, attn, embed, mode, cu)
    fast = L.pool(hf, attn, embed, mode, cu_seqlens=cu, normalize=True, backend="triton")
    assert fast.dtype == dtype and fast.shape == oracle.shape
    assert_close_rule(fast, oracle, native, atol=ATOL[dtype], name="normalised")
    if dtype == torch.float32:
        tiny = min(eps_texts) + 1  # the 1e-15 text: x / eps, not x / ||x||
        assert 0 < float(fast[tiny].detach().norm()) < 1
    g = torch.randn(oracle.shape, device=device, dtype=torch.float64)
    (d64,) = torch.autograd.grad(oracle, h64, g)
    (dn,) = torch.autograd.grad(native, hn, g.to(dtype))
    (df,) = torch.autograd.grad(fast, hf, g.to(dtype))
    assert df.dtype == dtype and df.shape == h.shape
    _assert_grad_split(df, d64, dn, _rows_of(h, cu, eps_texts), dtype, "d hidden")


def test_pool_normalize_many_channel_blocks(device):
    """C = 8300: 65 pooled partials per row (more than one NORM_BLOCK_S = 64 chunk) and nine
    normalisation blocks, the last ragged."""
    tk = _tk()
    B, T, C = 2, 3, 8300
    assert -(-C // tk.pool_block_c(C)) > tk.NORM_BLOCK_S and -(-C // tk.norm_block_c(C)) == 9
    h = torch.randn(B, T, C, device=device, requires_grad=True)
    attn = torch.ones(B, T, dtype=torch.bool, device=device)
    attn[1, 2] = False
    h64 = h.detach().double().requires_grad_()
    oracle = F.normalize(ref.pool_ref(h64, attn, None, "weighted_mean"), dim=-1)
    native = F.normalize(ref.pool_ref(h, attn, None, "weighted_mean", upcast=False), dim=-1)
    fast = L.pool(h, attn, None, "weighted_mean", normalize=True, backend="triton")
    assert_close_rule(fast, oracle, native, atol=1e-6, name="normalised")
    g = torch.randn(B, C, device=device, dtype=torch.float64)
    (d64,) = torch.autograd.grad(oracle, h64, g)
    (dn,) = torch.autograd.grad(native, h, g.float())
    (df,) = torch.autograd.grad(fast, h, g.float())
    assert_close_rule(df, d64, dn, factor=3.0, atol=1e-6, name="d hidden")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("C", [1, 48, 1300])  # 1300: a full and a ragged 1024-wide block
def test_l2norm_matches_reference(C, dtype, device):
    """The embeddings' normalisation: rows with norm 0 and (fp32) below eps, a row-strided
    input, NaN-poisoned outputs; against F.normalize in fp64 (oracle) and on the fp32
    upcast, which is what the reference loss does (``info_nce_ref``)."""
    tk = _tk()
    R = 7
    base = torch.randn(2 * R, C, device=device)
    base[0] = 0.0
    base[2] *= 1e-15
    x = base.to(dtype)[::2]  # row stride 2C
    x64 = x.detach().double().requires_grad_()
    xn = x.detach().clone().requires_grad_()
    oracle = F.normalize(x64, dim=-1)
    native = F.normalize(xn.float(), dim=-1)
    y = poison_(torch.empty(R, C, device=device))
    _, nrm = tk.l2norm_forward(x, out=y)
    assert_close_rule(y, oracle, native, atol=1e-6, name="y")
    assert max_err(nrm, x64.detach().norm(dim=1)) <= 1e-6 * (1 + float(x64.detach().norm(dim=1).max()))
    g = torch.randn(R, C, device=device, dtype=torch.float64)
    (d64,) = torch.autograd.grad(oracle, x64, g)
    (dn,) = torch.autograd.grad(native, xn, g.float())
    dx = poison_(torch.empty(R, C, device=device, dtype=dtype))
    tk.l2norm_backward(g.float(), y, nrm, dtype, dx=dx)
    assert not torch.isnan(dx).any()
    eps_rows = x64.detach().norm(dim=1) < 1e-12
    assert eps_rows[:2].all() and not eps_rows[2:].any()
    _assert_grad_split(dx, d64, dn, eps_rows, dtype, "dx")
    # Through autograd (the path info_nce takes), the same numbers.
    xf = x.detach().clone().requires_grad_()
    yf = tk._L2NormFn.apply(xf)
    (dxf,) = torch.autograd.grad(yf, xf, g.float())
    assert yf.dtype == torch.float32 and dxf.dtype == dtype
    assert max_err(yf, y) == 0 and max_err(dxf, dx) == 0


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("pooling,symmetric", [("mean", True), ("last_token", False)])
def test_pooled_info_nce_eps_rows(pooling, symmetric, layout, dtype, device):
    """The pooled loss with queries and documents whose pooled vectors are zero or below eps
    (their normalised embedding is x / eps; their d hidden ~1e12, inf in fp16), plus
    ordinary hard negatives; loss and every d hidden against the fp64 reference."""
    C = 80
    q, d = _eps_case(layout, C, dtype, device), _eps_case(layout, C, dtype, device)
    neg = _pool_case(layout, 3, 13, C, dtype, device, empty_row=False)
    inputs = {"q": q[:4], "d": d[:4], "neg": neg}
    h64 = [inputs[p][0].detach().double().requires_grad_() for p in ("q", "d", "neg")]
    hn = [inputs[p][0].detach().clone().requires_grad_() for p in ("q", "d", "neg")]
    hf = [inputs[p][0].detach().clone().requires_grad_() for p in ("q", "d", "neg")]
    oracle = _call(ref.pooled_info_nce_ref, inputs, h64, temperature=0.05, pooling=pooling, symmetric=symmetric)
    native = _native_pooled(inputs, hn, pooling, symmetric)
    fast = _call(L.pooled_info_nce, inputs, hf, temperature=0.05, pooling=pooling, symmetric=symmetric,
                 backend="triton")
    assert torch.isfinite(fast)
    assert_close_rule(fast, oracle, native, atol=1e-5, name="loss")
    g64, gn, gf = (torch.autograd.grad(x, h) for x, h in ((oracle, h64), (native, hn), (fast, hf)))
    for i, (p, case) in enumerate((("q", q), ("d", d))):
        _assert_grad_split(gf[i], g64[i], gn[i], _rows_of(case[0], case[3], case[4]), dtype, f"d hidden_{p}")
    assert_close_rule(gf[2], g64[2], gn[2], factor=3.0, atol=ATOL[dtype], name="d hidden_neg")


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
               normalize=st.booleans(), seed=st.integers(0, 2**16))
    def check(B, T, C, mode, normalize, seed):
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(B, T, C, generator=g).to(device)
        attn = (torch.rand(B, T, generator=g) > 0.4).to(device)
        embed = (torch.rand(B, T, generator=g) > 0.2).to(device)
        out = L.pool(h, attn, embed, mode, normalize=normalize, backend="triton")
        want = ref.pool_ref(h.double(), attn, embed, mode)
        assert max_err(out, F.normalize(want, dim=-1) if normalize else want) < 1e-5

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


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fn", ["info_nce", "pooled_info_nce"])
def test_loss_under_autocast_keeps_fp32_scores(fn, backend, device):
    """Under autocast the similarity matmul and the pooled sums stay fp32 and the backward
    runs (it met an autocast-lowered score matrix against fp32 embeddings): the loss and the
    gradients equal those without autocast."""
    B, T, C = 5, 9, 48
    h = [torch.randn(B, T, C, device=device) for _ in range(3)]
    attn, embed = _padded_masks(B, T, device, empty_row=False)

    def run(autocast):
        xs = [t.detach().clone().requires_grad_() for t in h]
        with torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
            if fn == "info_nce":
                loss = L.info_nce(xs[0][:, 0], xs[1][:, 0], xs[2][:, 0], symmetric=True, backend=backend)
            else:
                loss = L.pooled_info_nce(xs[0], attn, xs[1], attn, embed_mask_q=embed, hidden_neg=xs[2],
                                         mask_neg=attn, symmetric=True, backend=backend)
        loss.backward()
        return loss.detach(), [x.grad for x in xs]

    l0, g0 = run(False)
    l1, g1 = run(True)
    assert l1.dtype == torch.float32
    assert max_err(l1, l0) <= 1e-6, (float(l0), float(l1))
    for a, b in zip(g1, g0):
        assert max_err(a, b) <= 1e-6 * (b.abs().max().item() + 1e-12)


def test_pool_fp64_and_out_dtype(device):
    """fp64 input pools in fp64 (every backend falls back to the reference for it), and
    ``out_dtype=torch.float32`` returns the fp32 sums of 16-bit input unrounded."""
    h, attn, embed, _ = _pool_case("padded", 3, 11, 40, torch.float64, device, empty_row=False)
    h.requires_grad_()
    for backend in ("torch", "triton"):
        out = L.pool(h, attn, embed, "mean", backend=backend)
        region = (attn.bool() & embed).double()
        want = (h * region[..., None]).sum(1) / region.sum(1, keepdim=True).clamp_min(1)
        assert out.dtype == torch.float64 and max_err(out, want) < 1e-14
    assert torch.autograd.gradcheck(lambda x: L.pool(x, attn, embed, "weighted_mean", backend="torch"), (h,))
    h16 = h.detach().to(torch.float16)
    want = ref.pool_ref(h16.double(), attn, embed, "mean")
    for backend in ("torch", "triton"):
        out = L.pool(h16, attn, embed, "mean", backend=backend, out_dtype=torch.float32)
        assert out.dtype == torch.float32 and max_err(out, want) < 1e-6
        rounded = L.pool(h16, attn, embed, "mean", backend=backend)
        assert rounded.dtype == torch.float16 and max_err(rounded, want) > 1e-5  # the rounding the option avoids


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("mode", MODES)
def test_pool_gradient_outside_the_region_is_zero_even_for_an_inf_gradient(mode, layout, backend, device):
    """A text whose incoming gradient is inf (an fp16 loss-scaling overflow): its tokens
    outside the pooled region still get exactly 0 (the kernel computed 0 * inf = NaN there)."""
    h, attn, embed, cu = _pool_case(layout, 3, 11, 40, torch.float32, device, empty_row=False)
    h.requires_grad_()
    out = L.pool(h, attn, embed, mode, cu_seqlens=cu, backend=backend)
    g = torch.randn_like(out)
    g[1, :5] = float("inf")
    (dh,) = torch.autograd.grad(out, h, g)
    if cu is None:
        outside = ~(attn.bool() & embed)
    else:
        outside = ~embed
    assert outside.any() and (dh[outside] == 0).all()

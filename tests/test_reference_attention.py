"""The attention references against per-sequence SDPA, and fp64 gradcheck."""
import pytest
import torch
import torch.nn.functional as F

import llm2vec_fast as L
from llm2vec_fast.kernels import reference as ref
from helpers import max_err


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _sdpa_seq(q, k, v, scale=None):
    # (s, H, D) x (s, Hkv, D): an independent formulation that repeats K/V explicitly.
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale)
    return o[0].transpose(0, 1)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("lens", [[1], [17, 5, 1], [9, 0, 13]])
def test_varlen_matches_per_sequence_sdpa(H, Hkv, lens):
    D = 16
    cu = _cu(lens)
    tot = sum(lens)
    q, k, v = torch.randn(tot, H, D), torch.randn(tot, Hkv, D), torch.randn(tot, Hkv, D)
    out, lse = L.flash_attn_varlen_noncausal(q, k, v, cu, cu, max(lens), max(lens), backend="torch", return_lse=True)
    assert out.shape == (tot, H, D) and lse.shape == (H, tot)
    for b in range(len(lens)):
        s, e = int(cu[b]), int(cu[b + 1])
        if e > s:
            assert max_err(out[s:e], _sdpa_seq(q[s:e], k[s:e], v[s:e])) < 1e-5
            scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e].repeat_interleave(H // Hkv, 1)) / D**0.5
            assert max_err(lse[:, s:e], torch.logsumexp(scores, -1)) < 1e-5


def test_varlen_softcap_and_scale():
    lens = [7, 3]
    cu = _cu(lens)
    q, k, v = torch.randn(10, 2, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    out = L.flash_attn_varlen_noncausal(q, k, v, cu, cu, 7, 7, softmax_scale=0.3, softcap=2.0, backend="torch")
    s = torch.einsum("qhd,khd->hqk", q[:7], k[:7]) * 0.3
    p = torch.softmax(2.0 * torch.tanh(s / 2.0), -1)
    assert max_err(out[:7], torch.einsum("hqk,khd->qhd", p, v[:7])) < 1e-5


@pytest.mark.parametrize("pattern", ["full", "right", "left", "random", "empty_row"])
def test_padded_matches_varlen(pattern):
    B, S, H, Hkv, D = 3, 13, 4, 2, 16
    q, k, v = torch.randn(B, S, H, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    m = torch.ones(B, S, dtype=torch.bool)
    if pattern == "right":
        m[0, 9:] = False; m[2, 4:] = False
    elif pattern == "left":
        m[0, :3] = False; m[1, :12] = False
    elif pattern == "random":
        m = torch.rand(B, S) > 0.4
        m[:, 0] = True
    elif pattern == "empty_row":
        m[1] = False
    for fn in (ref.attention_padded_ref, L.flash_attn_noncausal):
        out = fn(q, k, v, m)
        assert not out.isnan().any()
        for b in range(B):
            idx = m[b].nonzero().squeeze(1)
            if idx.numel():
                want = _sdpa_seq(q[b, idx], k[b, idx], v[b, idx])
                assert max_err(out[b, idx], want) < 1e-5
            assert (out[b, ~m[b]] == 0).all()
    _, lse = ref.attention_padded_ref(q, k, v, m, return_lse=True)
    assert torch.isneginf(lse.transpose(1, 2)[~m]).all()


def test_padded_dropout_is_applied_in_training():
    q = torch.randn(2, 9, 2, 8)
    a = L.flash_attn_noncausal(q, q, q, dropout_p=0.5)
    b = L.flash_attn_noncausal(q, q, q, dropout_p=0.0)
    assert max_err(a, b) > 1e-3


def test_gradcheck_varlen_fp64():
    lens = [3, 1, 4]
    cu = _cu(lens)
    q = torch.randn(8, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(8, 2, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(8, 2, 5, dtype=torch.float64, requires_grad=True)
    f = lambda q, k, v: L.flash_attn_varlen_noncausal(q, k, v, cu, cu, 4, 4, softcap=3.0, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradcheck_padded_fp64():
    m = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    q = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 1, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, 1, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: L.flash_attn_noncausal(q, k, v, m, backend="torch"), (q, k, v))


def test_fp16_reference_upcasts():
    lens = [20]
    cu = _cu(lens)
    q, k, v = (torch.randn(20, 2, 16) for _ in range(3))
    o32 = L.flash_attn_varlen_noncausal(q, k, v, cu, cu, 20, 20, backend="torch")
    o16 = L.flash_attn_varlen_noncausal(q.half(), k.half(), v.half(), cu, cu, 20, 20, backend="torch")
    assert o16.dtype == torch.float16 and max_err(o16.float(), o32) < 5e-3

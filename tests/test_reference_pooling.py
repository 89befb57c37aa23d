"""pool / info_nce / pooled_info_nce references against plain loops over the batch, and fp64 gradcheck."""
import pytest
import torch
import torch.nn.functional as F

import llm2vec_fast as L
from llm2vec_fast.kernels.reference import POOLING_MODES
from helpers import max_err


def _loop_pool(hidden, attn, embed, mode):
    out = []
    for b in range(hidden.shape[0]):
        idx = [t for t in range(hidden.shape[1]) if attn[b, t] and (embed is None or embed[b, t])]
        if not idx:
            out.append(torch.zeros(hidden.shape[-1]))
            continue
        h = hidden[b, idx].double()
        if mode == "mean":
            out.append(h.mean(0))
        elif mode == "weighted_mean":
            w = torch.arange(1, len(idx) + 1, dtype=torch.float64)
            out.append((h * w[:, None]).sum(0) / w.sum())
        elif mode in ("last_token", "eos_token"):
            out.append(h[-1])
        else:
            out.append(h[0])
    return torch.stack(out).float()


def _masks(B, T):
    attn = torch.ones(B, T, dtype=torch.long)
    attn[0, :3] = 0  # left padding
    attn[1, T - 4 :] = 0  # right padding
    embed = attn.clone()
    embed[2, :2] = 0  # an instruction
    return attn, embed


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("with_embed", [False, True])
def test_pool_matches_loop(mode, with_embed):
    B, T, C = 4, 9, 6
    h = torch.randn(B, T, C)
    attn, embed = _masks(B, T)
    e = embed if with_embed else None
    got = L.pool(h, attn, e, mode=mode, backend="torch")
    assert max_err(got, _loop_pool(h, attn, e, mode)) < 1e-5


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pool_packed_equals_padded(mode):
    lens = [3, 7, 1]
    C = 5
    cu = torch.tensor([0, 3, 10, 11], dtype=torch.int32)
    packed = torch.randn(11, C)
    embed_p = torch.ones(11, dtype=torch.long)
    embed_p[3:5] = 0
    padded = torch.zeros(3, 7, C)
    attn = torch.zeros(3, 7, dtype=torch.long)
    embed = torch.zeros(3, 7, dtype=torch.long)
    for b, n in enumerate(lens):
        padded[b, :n] = packed[cu[b] : cu[b + 1]]
        attn[b, :n] = 1
        embed[b, :n] = embed_p[cu[b] : cu[b + 1]]
    a = L.pool(packed, None, embed_p, mode=mode, cu_seqlens=cu, backend="torch")
    b = L.pool(padded, attn, embed, mode=mode, backend="torch")
    assert max_err(a, b) < 1e-6


def test_empty_region_pools_to_zero_vector():
    h = torch.randn(2, 4, 3)
    attn = torch.ones(2, 4, dtype=torch.long)
    embed = torch.zeros(2, 4, dtype=torch.long)
    embed[0, 1] = 1
    for mode in POOLING_MODES:
        out = L.pool(h, attn, embed, mode=mode, normalize=True, backend="torch")
        assert not out.isnan().any() and (out[1] == 0).all()


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("packed", [False, True])
def test_tokens_outside_the_region_never_reach_the_result(mode, packed):
    """Padding and instruction tokens holding NaN (what a fully masked attention row can give)
    leave the pooled vector and the pooled InfoNCE loss as they are with zeros there, and get
    a zero gradient: the reference selects them out rather than weighting them by 0."""
    B, T, C = 4, 9, 6
    attn, embed = _masks(B, T)
    region = (attn * embed).bool()
    base = torch.randn(B, T, C)
    cu = None
    if packed:  # the valid tokens of each row, packed; instruction tokens stay in
        lens = attn.sum(1)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)])

    def run(fill):
        h = base.clone()
        h[~region] = fill
        if packed:
            h, e, m = h[attn.bool()], embed[attn.bool()], None
        else:
            e, m = embed, attn
        h.requires_grad_()
        out = L.pool(h, m, e, mode=mode, cu_seqlens=cu, backend="torch")
        loss = L.pooled_info_nce(h, m, h, m, embed_mask_q=e, embed_mask_d=e,
                                 cu_seqlens_q=cu, cu_seqlens_d=cu, pooling=mode, backend="torch")
        (out.sum() + loss).backward()
        return out.detach(), loss.detach(), h.grad, (region[attn.bool()] if packed else region)

    (out0, loss0, g0, keep), (out1, loss1, g1, _) = run(0.0), run(float("nan"))
    assert torch.equal(out0, out1) and torch.equal(loss0, loss1)
    assert torch.isfinite(g1).all() and torch.equal(g0, g1) and (g1[~keep] == 0).all()


def _loop_info_nce(q, d, neg, t, symmetric):
    q, d = F.normalize(q.double(), dim=-1), F.normalize(d.double(), dim=-1)
    cols = d if neg is None else torch.cat([d, F.normalize(neg.double(), dim=-1)])
    total = 0.0
    for i in range(q.shape[0]):
        logits = torch.stack([q[i] @ c for c in cols]) / t
        total = total - torch.log_softmax(logits, 0)[i]
    loss = total / q.shape[0]
    if symmetric:
        back = 0.0
        for i in range(q.shape[0]):
            logits = torch.stack([d[i] @ c for c in q]) / t
            back = back - torch.log_softmax(logits, 0)[i]
        loss = 0.5 * (loss + back / q.shape[0])
    return loss


@pytest.mark.parametrize("with_neg", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_matches_loop(with_neg, symmetric):
    q, d = torch.randn(5, 7), torch.randn(5, 7)
    neg = torch.randn(5, 7) if with_neg else None
    got = L.info_nce(q, d, neg, temperature=0.1, symmetric=symmetric, backend="torch")
    assert abs(float(got) - float(_loop_info_nce(q, d, neg, 0.1, symmetric))) < 1e-5


def test_pooled_info_nce_is_the_composition():
    B, T, C = 3, 6, 4
    hq, hd, hn = torch.randn(B, T, C), torch.randn(B, T + 2, C), torch.randn(B, T, C)
    mq, _ = _masks(B, T)
    md = torch.ones(B, T + 2, dtype=torch.long)
    md[0, -3:] = 0
    got = L.pooled_info_nce(hq, mq, hd, md, hidden_neg=hn, mask_neg=mq, pooling="weighted_mean", temperature=0.05, backend="torch")
    eq = _loop_pool(hq, mq, None, "weighted_mean")
    ed = _loop_pool(hd, md, None, "weighted_mean")
    en = _loop_pool(hn, mq, None, "weighted_mean")
    assert abs(float(got) - float(_loop_info_nce(eq, ed, en, 0.05, False))) < 1e-4


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_gradcheck_pooled_info_nce_fp64(mode):
    B, T, C = 3, 4, 3
    hq = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    hd = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    m, e = _masks(B, T)
    f = lambda a, b: L.pooled_info_nce(a, m, b, m, embed_mask_q=e, pooling=mode, symmetric=True, temperature=0.5, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(f, (hq, hd))

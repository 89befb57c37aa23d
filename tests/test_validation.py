"""Bad input: each raises a ValueError naming the argument, before any kernel runs."""
import pytest
import torch

import llm2vec_fast as L


def _cu(*v):
    return torch.tensor(v, dtype=torch.int32)


def varlen(**over):
    args = dict(q=torch.randn(6, 4, 8), k=torch.randn(6, 2, 8), v=torch.randn(6, 2, 8), cu_seqlens_q=_cu(0, 2, 6),
                cu_seqlens_k=_cu(0, 2, 6), max_seqlen_q=4, max_seqlen_k=4)
    args.update(over)
    return L.flash_attn_varlen_noncausal(**args, backend="torch")


@pytest.mark.parametrize("over,needle", [
    (dict(q=torch.randn(6, 4)), "q"),
    (dict(k=torch.randn(6, 3, 8), v=torch.randn(6, 3, 8)), "H % Hkv"),
    (dict(v=torch.randn(6, 2, 4)), "v"),
    (dict(k=torch.randn(6, 2, 8).double()), "k"),
    (dict(cu_seqlens_q=torch.tensor([0, 2, 6])), "cu_seqlens_q"),
    (dict(cu_seqlens_q=_cu(0, 4, 2, 6)), "cu_seqlens_q"),
    (dict(cu_seqlens_k=_cu(0, 2, 5)), "cu_seqlens_k"),
    (dict(cu_seqlens_q=_cu(1, 2, 6)), "cu_seqlens_q"),
    (dict(max_seqlen_q=4.0), "max_seqlen_q"),
])
def test_attention_varlen_bad_input(over, needle):
    with pytest.raises(ValueError, match=needle.replace("%", "%")):
        varlen(**over)


def test_attention_padded_bad_input():
    q = torch.randn(2, 5, 4, 8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        L.flash_attn_noncausal(q, q, q, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        L.flash_attn_noncausal(q, q, q, torch.ones(2, 5))
    with pytest.raises(ValueError, match="backend"):
        L.flash_attn_noncausal(q, q, q, backend="cudnn")
    with pytest.raises(ValueError, match="softcap"):
        L.flash_attn_noncausal(q, q, q, softcap=-1.0)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 3, 2, 16)
    with pytest.raises(ValueError, match="triton"):
        L.flash_attn_noncausal(q, q, q, backend="triton")


def test_masked_ce_bad_input():
    h, w = torch.randn(2, 5, 8), torch.randn(20, 8)
    y = torch.randint(0, 20, (2, 5))
    with pytest.raises(ValueError, match="labels"):
        L.masked_linear_cross_entropy(h, w, torch.full((2, 5), 20))
    with pytest.raises(ValueError, match="labels"):
        L.masked_linear_cross_entropy(h, w, torch.full((2, 5), -1))
    with pytest.raises(ValueError, match="labels"):
        L.masked_linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match="labels"):
        L.masked_linear_cross_entropy(h, w, y[:, :4])
    with pytest.raises(ValueError, match="weight"):
        L.masked_linear_cross_entropy(h, torch.randn(20, 7), y)
    with pytest.raises(ValueError, match="weight"):
        L.masked_linear_cross_entropy(h, w.half(), y)
    with pytest.raises(ValueError, match="hidden"):
        L.masked_linear_cross_entropy(torch.randn(8), w, y)
    with pytest.raises(ValueError, match="reduction"):
        L.masked_linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="bias"):
        L.masked_linear_cross_entropy(h, w, y, torch.randn(19))
    with pytest.raises(ValueError, match="shift"):
        L.masked_linear_cross_entropy(h, w, y, shift=5)


def test_pooling_bad_input():
    h = torch.randn(2, 5, 4)
    m = torch.ones(2, 5)
    with pytest.raises(ValueError, match="mode"):
        L.pool(h, m, mode="max")
    with pytest.raises(ValueError, match="attention_mask"):
        L.pool(h, torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        L.pool(h, None)
    with pytest.raises(ValueError, match="embed_mask"):
        L.pool(h, m, torch.ones(3, 5))
    with pytest.raises(ValueError, match="cu_seqlens"):
        L.pool(torch.randn(5, 4), None, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="pooling"):
        L.pooled_info_nce(h, m, h, m, pooling="cls")
    with pytest.raises(ValueError, match="emb_d"):
        L.info_nce(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        L.info_nce(torch.randn(3, 4), torch.randn(3, 4), temperature=0)
    with pytest.raises(ValueError, match="hidden_d"):
        L.pooled_info_nce(h, m, torch.randn(3, 5, 4), torch.ones(3, 5))

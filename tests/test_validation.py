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
    # triton imported here first would build its own jit helpers (tl.sum, ...) uninterpreted
    # for the rest of the process: import it while the interpreter setting still holds
    pytest.importorskip("triton")
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_ce_label_range_in_the_one_sync(backend):
    """The label range check rides on the op's one host sync (finding the labelled rows):
    a forward + backward makes one ``nonzero`` and reads no other value to the host; a label
    outside [0, V) that the shift keeps raises with its value, one the shift drops (the
    first position's, predicted by nothing) is never read."""
    if backend == "triton":
        pytest.importorskip("triton")
        from llm2vec_fast.ops._dispatch import interpreter_on

        if not (torch.cuda.is_available() or interpreter_on()):
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    dev = "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 9, 16, generator=g).to(dev).requires_grad_()
    w = torch.randn(37, 16, generator=g).to(dev).requires_grad_()
    y = torch.randint(0, 37, (2, 9), generator=g)
    y[:, 3] = -100
    y[:, 0] = 37  # out of range, but dropped by the shift
    y = y.to(dev)
    L.masked_linear_cross_entropy(h, w, y, backend=backend).backward()  # one-time probes / compiles first
    with Count() as c:
        L.masked_linear_cross_entropy(h, w, y, backend=backend).backward()
    host_reads = [o for o in c.ops if o.startswith(("_local_scalar_dense", "item", "is_nonzero"))]
    assert c.ops.count("nonzero.default") == 1 and not host_reads, c.ops
    for bad in (37, -1, 10**6):
        y2 = y.clone()
        y2[1, 5] = bad
        with pytest.raises(ValueError, match=f"labels: expected values in \\[0, 37\\).*found {bad}"):
            L.masked_linear_cross_entropy(h, w, y2, backend=backend)
    y2 = torch.where(y == -100, -7, y)
    L.masked_linear_cross_entropy(h, w, y2, ignore_index=-7, backend=backend)  # any ignore_index is fine
    with pytest.raises(ValueError, match="found -100"):  # ... and the default one is then out of range
        L.masked_linear_cross_entropy(h, w, y, ignore_index=-7, backend=backend)


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
    with pytest.raises(ValueError, match="hidden_neg: expected hidden size 4"):
        L.pooled_info_nce(h, m, h, m, hidden_neg=torch.randn(3, 5, 9), mask_neg=torch.ones(3, 5))
    with pytest.raises(ValueError, match="hidden_neg: .*dtype torch.float32"):
        L.pooled_info_nce(h, m, h, m, hidden_neg=torch.randn(3, 5, 4, dtype=torch.float64), mask_neg=torch.ones(3, 5))
    with pytest.raises(ValueError, match="hidden_q: expected at least one row"):
        L.pooled_info_nce(h[:0], m[:0], h[:0], m[:0])
    with pytest.raises(ValueError, match="out_dtype"):
        L.pool(h, m, out_dtype=torch.int32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("over,needle", [
    (dict(softcap=float("inf")), "softcap"),
    (dict(softcap=float("nan")), "softcap"),
    (dict(softcap=0.0), "softcap"),
    (dict(softcap=-2.0), "softcap"),
    (dict(softcap="30"), "softcap"),
    (dict(z_loss=float("nan")), "z_loss"),
    (dict(z_loss=float("inf")), "z_loss"),
    (dict(z_loss=-1e-4), "z_loss"),
    (dict(z_loss=None), "z_loss"),
    (dict(label_smoothing=None), "label_smoothing"),
    (dict(label_smoothing=float("nan")), "label_smoothing"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(label_smoothing="0.1"), "label_smoothing"),
    (dict(ignore_index=None), "ignore_index"),
    (dict(ignore_index=-100.0), "ignore_index"),
    (dict(ignore_index=torch.tensor(-100)), "ignore_index"),
    (dict(hidden=torch.randn(2, 5, 0), weight=torch.randn(20, 0)), "hidden"),
    (dict(hidden=torch.randn(5, 0), weight=torch.randn(20, 0), labels=torch.randint(0, 20, (5,))), "hidden"),
])
def test_masked_ce_bad_options(backend, over, needle):
    """Option values that would give NaN / inf losses, or fail deep inside with a TypeError /
    RuntimeError, raise a ValueError naming the argument, on either backend (before dispatch)."""
    args = dict(hidden=torch.randn(2, 5, 8), weight=torch.randn(20, 8), labels=torch.randint(0, 20, (2, 5)))
    args.update(over)
    with pytest.raises(ValueError, match=f"^{needle}:"):
        L.masked_linear_cross_entropy(**args, backend=backend)


def test_masked_ce_good_options_still_pass():
    """The boundaries that stay allowed: no softcap (None), an int softcap, z_loss 0,
    label_smoothing 0, NumPy numbers, an ignore_index outside int32 with int32 labels."""
    import numpy as np

    h, w = torch.randn(2, 5, 8), torch.randn(20, 8)
    y = torch.randint(0, 20, (2, 5))
    base = L.masked_linear_cross_entropy(h, w, y, backend="torch")
    for kw in (dict(softcap=None, z_loss=0.0, label_smoothing=0.0), dict(softcap=30), dict(softcap=np.float32(30.0)),
               dict(z_loss=np.float64(0.0)), dict(ignore_index=np.int64(-100))):
        assert torch.isfinite(L.masked_linear_cross_entropy(h, w, y, backend="torch", **kw)), kw
    assert float(L.masked_linear_cross_entropy(h, w, y, ignore_index=np.int64(-100), backend="torch")) == float(base)
    L.masked_linear_cross_entropy(h, w, y.int(), ignore_index=2**40, backend="torch")

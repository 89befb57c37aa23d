"""The chunked masked linear cross-entropy reference against F.cross_entropy on full logits."""
import pytest
import torch
import torch.nn.functional as F

import llm2vec_fast as L
from helpers import max_err
from llm2vec_fast.kernels.reference import masked_linear_cross_entropy_ref


def _full(hidden, weight, labels, bias, shift, softcap, smoothing, reduction="mean"):
    h = hidden.double()
    if shift:
        h = h[:, :-shift] if h.dim() == 3 else h[:-shift]
        labels = labels[:, shift:] if labels.dim() == 2 else labels[shift:]
    z = h @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    V = weight.shape[0]
    loss = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), ignore_index=-100, label_smoothing=smoothing, reduction=reduction)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    return loss, z, labels


@pytest.mark.parametrize("shape", [(2, 11), (37,)])
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("softcap,smoothing,use_bias", [(None, 0.0, False), (4.0, 0.1, True), (None, 0.2, True)])
@pytest.mark.parametrize("strategy", ["two_pass", "eager"])
def test_matches_full_logits(shape, shift, softcap, smoothing, use_bias, strategy):
    C, V = 24, 123
    hidden = torch.randn(*shape, C, requires_grad=True)
    weight = torch.randn(V, C, requires_grad=True)
    bias = torch.randn(V, requires_grad=True) if use_bias else None
    labels = torch.randint(0, V, shape)
    labels[torch.rand(shape) < 0.6] = -100
    for reduction in ("mean", "sum", "none"):
        loss = L.masked_linear_cross_entropy(
            hidden, weight, labels, bias, shift=shift, softcap=softcap, label_smoothing=smoothing, reduction=reduction, backend="torch"
        )
        want, _, _ = _full(hidden, weight, labels, bias, shift, softcap, smoothing, reduction)
        assert max_err(loss, want) < 1e-4 * max(1.0, float(want.abs().max()))
    params = [hidden, weight] + ([bias] if use_bias else [])
    for reduction in ("mean", "sum"):
        # small chunks: several row chunks (eager: 2 rows of 123 columns each), partial last ones
        loss = masked_linear_cross_entropy_ref(hidden, weight, labels, bias, shift=shift, softcap=softcap,
                                               label_smoothing=smoothing, reduction=reduction,
                                               strategy=strategy, chunk_rows=5, chunk_vocab=50)
        want, _, _ = _full(hidden, weight, labels, bias, shift, softcap, smoothing, reduction)
        g = torch.autograd.grad(loss * 1.7, params)
        gw = torch.autograd.grad(want * 1.7, params)
        for a, b in zip(g, gw):
            assert max_err(a, b) < 1e-5 * max(1.0, float(b.abs().max()))


def test_chunking_does_not_change_result():
    h, w = torch.randn(3, 40, 16), torch.randn(301, 16)
    y = torch.randint(0, 301, (3, 40))
    a = masked_linear_cross_entropy_ref(h, w, y, z_loss=1e-3)
    b = masked_linear_cross_entropy_ref(h, w, y, z_loss=1e-3, chunk_rows=7, chunk_vocab=50)
    assert max_err(a, b) < 1e-5


def test_accuracy_and_z_loss():
    C, V = 16, 50
    h, w = torch.randn(60, C), torch.randn(V, C)
    y = torch.randint(0, V, (60,))
    y[::3] = -100
    loss, acc = L.masked_linear_cross_entropy(h, w, y, shift=0, z_loss=0.01, return_accuracy=True, backend="torch")
    z = h @ w.t()
    keep = y != -100
    want_acc = (z[keep].argmax(-1) == y[keep]).float().mean()
    lse = torch.logsumexp(z[keep], -1)
    want = F.cross_entropy(z[keep], y[keep]) + 0.01 * (lse**2).mean()
    assert abs(float(acc) - float(want_acc)) < 1e-6
    assert max_err(loss, want) < 1e-5


def test_all_ignored_gives_zero_loss_and_zero_grads():
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    y = torch.full((2, 5), -100)
    loss, acc = L.masked_linear_cross_entropy(h, w, y, return_accuracy=True, backend="torch")
    loss.backward()
    assert float(loss) == 0.0 and not torch.isnan(loss)
    assert (h.grad == 0).all() and (w.grad == 0).all() and float(acc) == 0.0


@pytest.mark.parametrize("strategy", ["two_pass", "eager"])
def test_gradcheck_fp64(strategy):
    h = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (2, 6))
    y[0, 2] = -100

    def f(h, w, b):
        return L.masked_linear_cross_entropy(
            h, w, y, b, softcap=3.0, label_smoothing=0.1, z_loss=0.01, backend="torch", strategy=strategy,
        )

    # gradcheck runs the backward twice on one graph: the eager strategy hands its forward's
    # gradients to the first call and recomputes them (two-pass) for the second, equal to
    # rounding, not bit for bit.
    assert torch.autograd.gradcheck(f, (h, w, b), nondet_tol=1e-12 if strategy == "eager" else 0.0)


def test_fp16_inputs_upcast():
    h, w = torch.randn(50, 32), torch.randn(100, 32) * 0.2
    y = torch.randint(0, 100, (50,))
    a = L.masked_linear_cross_entropy(h, w, y, shift=0, backend="torch")
    b = L.masked_linear_cross_entropy(h.half(), w.half(), y, shift=0, backend="torch")
    assert b.dtype == torch.float32 and abs(float(a) - float(b)) < 1e-2

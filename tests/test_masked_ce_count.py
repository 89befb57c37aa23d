"""``masked_linear_cross_entropy(..., num_labelled=n)``: the caller's count of labelled rows
makes the op sync-free (``torch.nonzero_static`` instead of ``torch.nonzero``), with the
same results as without it, and a wrong count or label is still refused (a device-side
assertion: a RuntimeError at once on the CPU). Both backends; the Triton one interpreted.
"""
from __future__ import annotations

import pytest
import torch

import llm2vec_fast as L

pytestmark = pytest.mark.interpreter

BACKENDS = ["torch", "triton"]


def _case(shape, C=32, V=97, frac=0.35, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, C, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, C, generator=g, dtype=dtype) / C ** 0.5).requires_grad_()
    bias = torch.randn(V, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) >= frac] = -100
    return hidden, weight, bias, labels


def _kept(labels, shift):
    return int((labels[..., shift:] != -100).sum())


def _run(hidden, weight, bias, labels, backend, **kw):
    loss, acc = L.masked_linear_cross_entropy(hidden, weight, labels, bias, backend=backend, return_accuracy=True, **kw)
    grads = torch.autograd.grad(loss.sum(), (hidden, weight, bias))
    return (loss.detach(), acc, *grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,shift", [((3, 21), 1), ((2, 17), 0), ((45,), 1)])
@pytest.mark.parametrize("reduction,strategy", [("mean", "auto"), ("sum", "two_pass"), ("none", "two_pass")])
def test_count_gives_the_same_results_without_nonzero(monkeypatch, backend, shape, shift, reduction, strategy):
    if backend == "triton":
        pytest.importorskip("triton")
    hidden, weight, bias, labels = _case(shape, seed=len(shape) + shift)
    kw = dict(shift=shift, reduction=reduction, strategy=strategy)
    want = _run(hidden, weight, bias, labels, backend, **kw)
    n = _kept(labels, shift)
    assert n > 3

    def no_nonzero(*a, **k):
        raise AssertionError("torch.nonzero (a host sync on a GPU) ran although num_labelled was given")

    monkeypatch.setattr(torch, "nonzero", no_nonzero)
    got = _run(hidden, weight, bias, labels, backend, num_labelled=n, **kw)
    for a, b in zip(got, want):  # the same rows in the same order: the same arithmetic
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_count_of_zero_and_all_ignored(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    hidden, weight, bias, labels = _case((2, 9))
    labels.fill_(-100)
    loss, acc, dh, dw, db = _run(hidden, weight, bias, labels, backend, num_labelled=0)
    assert float(loss) == 0.0 and float(acc) == 0.0
    assert not dh.any() and not dw.any() and not db.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_count_or_label_is_refused(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    hidden, weight, bias, labels = _case((2, 19), seed=3)
    n = _kept(labels, 1)
    for wrong in (n - 1, n + 1, 0):
        with pytest.raises(RuntimeError, match="num_labelled: .* given"):
            L.masked_linear_cross_entropy(hidden, weight, labels, bias, backend=backend, num_labelled=wrong)
    bad = labels.clone()
    bad[0, torch.nonzero(bad[0, 1:] != -100)[0, 0] + 1] = weight.shape[0]  # a kept label out of range
    with pytest.raises(RuntimeError, match=r"labels: expected values in \[0, 97\)"):
        L.masked_linear_cross_entropy(hidden, weight, bad, bias, backend=backend, num_labelled=n)
    # the label at position 0 is not one the shift keeps: neither counted nor checked
    first = labels.clone()
    first[:, 0] = -7
    L.masked_linear_cross_entropy(hidden, weight, first, bias, backend=backend, num_labelled=n)


@pytest.mark.parametrize("value", [True, -1, 2.0, "3", 2 * 18 + 1])
def test_bad_count_argument(value):
    hidden, weight, bias, labels = _case((2, 19))
    with pytest.raises(ValueError, match=r"num_labelled: expected None or an int in \[0, 36\]"):
        L.masked_linear_cross_entropy(hidden, weight, labels, bias, num_labelled=value)


def test_patched_causal_lm_takes_the_count():
    """``patch_model(..., mntp=True)``'s forward passes ``num_labelled`` to the loss (not to the
    base model) and gives the loss it gives without."""
    from llm2vec_fast import patch_model
    from llm2vec_fast.training.toy import toy_model

    model = patch_model(toy_model(True, seed=2), backend="torch", mntp=True)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=g)
    labels = torch.where(torch.rand(2, 12, generator=g) < 0.4, ids, torch.full_like(ids, -100))
    labels[:, 0] = -100
    plain = model(input_ids=ids, labels=labels).loss
    counted = model(input_ids=ids, labels=labels, num_labelled=int((labels != -100).sum())).loss
    assert torch.equal(plain, counted)
    with pytest.raises(RuntimeError, match="num_labelled"):
        model(input_ids=ids, labels=labels, num_labelled=int((labels != -100).sum()) + 1)

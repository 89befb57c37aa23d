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


def _all_ignored_inputs(kind, device="cpu"):
    """hidden (2, 9, C), weight (V, C), bias (V,) whose values would make a 0 built from them
    NaN (``x.sum() * 0``), and labels none of which the shift keeps (position 0's label is
    predicted by nothing). ``nan-inf``: NaN / inf in hidden (an unlabelled row), weight and
    bias. ``fp16-overflow``: finite fp16 values whose sums overflow to inf. ``fp64``: finite,
    to check the loss dtype."""
    C, V = 64, 123
    if kind == "fp16-overflow":
        h = (torch.rand(2, 9, C, device=device) * 100 + 900).half()  # sum ~ 1e6 > 65504
        w = (torch.rand(V, C, device=device) * 100 + 400).half()
        b = (torch.rand(V, device=device) * 100 + 60000).half()
    else:
        dt = torch.float64 if kind == "fp64" else torch.float32
        h, w, b = (torch.randn(*s, device=device, dtype=dt) for s in ((2, 9, C), (V, C), (V,)))
        if kind == "nan-inf":
            h[0, 3] = float("nan")
            h[1, 5, 7] = float("inf")
            w[7, 2] = float("-inf")
            b[3] = float("nan")
    y = torch.full((2, 9), -100, device=device)
    y[:, 0] = 5
    return h, w, b, y


def check_all_ignored(backend, kind, reduction, frozen_bias, device="cpu"):
    """Every label ignored: loss exactly 0 (zeros of the shifted label shape for 'none') in the
    dtype a labelled batch gets, accuracy 0, and exact-zero gradients of each input's own
    shape and dtype for every input that requires grad (None for the others)."""
    import llm2vec_fast as L

    h, w, b, y = _all_ignored_inputs(kind, device)
    ts = [h.requires_grad_(), w.requires_grad_(), b.requires_grad_(not frozen_bias)]
    loss, acc = L.masked_linear_cross_entropy(*ts[:2], y, ts[2], reduction=reduction, return_accuracy=True,
                                              backend=backend)
    y1 = y.clone()
    y1[0, 4] = 3  # one labelled row: the dtype the loss has otherwise
    with torch.no_grad():
        want_dtype = L.masked_linear_cross_entropy(*(t.nan_to_num(0.0).clamp(-1, 1) for t in ts[:2]), y1,
                                                   ts[2].nan_to_num(0.0).clamp(-1, 1), reduction=reduction,
                                                   backend=backend).dtype
    shape = (2, 8) if reduction == "none" else ()
    assert loss.dtype == want_dtype and loss.shape == shape, (loss.dtype, want_dtype, loss.shape)
    assert torch.equal(loss.detach(), torch.zeros(shape, dtype=want_dtype, device=device)), loss
    assert float(acc) == 0.0
    loss.sum().backward()
    for name, t in zip(("hidden", "weight", "bias"), ts):
        if not t.requires_grad:
            assert t.grad is None, name
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        assert (t.grad == 0).all(), name  # exact zeros (NaN fails this too)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind,frozen_bias", [("nan-inf", False), ("fp16-overflow", True), ("fp64", False)])
def test_all_ignored_reads_no_values(kind, frozen_bias, reduction):
    check_all_ignored("torch", kind, reduction, frozen_bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_changes_nothing(dtype):
    """Under torch.autocast (HF Trainer bf16=True / fp16=True with fp32 weights) the op's own
    GEMMs run with autocast off: the fp32 logits stay fp32, so loss and gradients equal those
    without autocast (both strategies, d weight and d bias included)."""
    h, w, b = torch.randn(3, 30, 32), torch.randn(201, 32) / 4, torch.randn(201)
    y = torch.randint(0, 201, (3, 30))
    y[torch.rand(3, 30) < 0.4] = -100
    for strategy in ("eager", "two_pass"):
        out = []
        for ac in (False, True):
            ts = [t.clone().requires_grad_() for t in (h, w, b)]
            with torch.autocast("cpu", dtype=dtype, enabled=ac):
                loss = L.masked_linear_cross_entropy(*ts[:2], y, ts[2], softcap=5.0, label_smoothing=0.1,
                                                     z_loss=1e-3, backend="torch", strategy=strategy)
                loss.backward()
            out.append([loss.detach()] + [t.grad for t in ts])
        for name, a, c in zip(("loss", "d hidden", "d weight", "d bias"), *out):
            assert a.dtype == c.dtype and max_err(a, c) <= 1e-6 * max(1.0, float(a.abs().max())), (strategy, name)


def test_torch_compile_does_not_recompile_per_labelled_count():
    """Traced, the chunk loop over the labelled rows guarded on their number: every batch with
    another count compiled again (up to Dynamo's limit). The op runs eagerly inside compiled
    code, so the graphs of the first call serve every count, with the eager results."""
    from torch._dynamo.utils import counters

    w = torch.randn(37, 16, requires_grad=True)

    def step(h, y):
        return L.masked_linear_cross_entropy(h * 2.0, w, y, backend="torch")

    torch._dynamo.reset()
    counters.clear()
    cstep = torch.compile(step, backend="aot_eager")
    graphs = None
    for n_lab in (3, 5, 8, 11, 2):
        g = torch.Generator().manual_seed(n_lab)
        h = torch.randn(2, 9, 16, generator=g, requires_grad=True)
        y = torch.full((2, 9), -100)
        pos = torch.randperm(18, generator=g)[:n_lab]
        y.view(-1)[pos] = torch.randint(0, 37, (n_lab,), generator=g)
        got = cstep(h, y)
        gh_c, gw_c = torch.autograd.grad(got, (h, w))
        want = step(h, y)
        gh_e, gw_e = torch.autograd.grad(want, (h, w))
        assert max_err(got, want) <= 1e-6 and max_err(gh_c, gh_e) <= 1e-6 and max_err(gw_c, gw_e) <= 1e-6
        graphs = graphs or counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs, n_lab

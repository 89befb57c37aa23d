"""Triton masked linear cross-entropy against F.cross_entropy on full fp64 logits.

Runs the kernels under the Triton interpreter on the CPU (fp32, fp16; bf16 tl.dot is wrong
there, see test_masked_ce_gpu.py) and the compiled kernels when a GPU is present. Every
kernel output buffer is poisoned (NaN / -7) before launch, the backward is forced through
several vocabulary chunks, and the budget is STYLE.md's rule against the reference run in
the input dtype.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llm2vec_fast as L
from helpers import assert_close_rule
from llm2vec_fast.kernels.reference import masked_linear_cross_entropy_ref

mce = pytest.importorskip("llm2vec_fast.kernels.triton.masked_ce")
SPLIT_ALIGN = mce.SPLIT_ALIGN

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    def alloc(shape, dtype, device):
        t = torch.empty(shape, device=device, dtype=dtype)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(-7)

    monkeypatch.setattr(mce, "_alloc", alloc)


def _oracle(hidden, weight, labels, bias, shift, softcap, label_smoothing, z_loss):
    """Per-position loss (shifted label shape, 0 where ignored), accuracy count, near-tie count, fp64."""
    h = hidden.double()
    if shift:
        h = h[:, :-shift] if h.dim() == 3 else h[:-shift]
        labels = labels[:, shift:] if labels.dim() == 2 else labels[shift:]
    z = h.reshape(-1, h.shape[-1]) @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    y = labels.reshape(-1)
    loss = F.cross_entropy(z, y, ignore_index=-100, label_smoothing=label_smoothing, reduction="none")
    keep = y != -100
    if z_loss:
        loss = loss + torch.where(keep, z_loss * torch.logsumexp(z, -1) ** 2, 0.0)
    zk, yk = z[keep], y[keep]
    correct = int((zk.argmax(-1) == yk).sum()) if keep.any() else 0
    near = 0
    if keep.any() and z.shape[1] > 1:
        top2 = zk.topk(2, dim=-1).values
        near = int(((top2[:, 0] - top2[:, 1]) < 1e-3).sum())
    return loss.reshape(labels.shape), correct, near, int(keep.sum())


def _make(shape, C, V, dtype, device, frac_ignored, use_bias, shift=1):
    hidden = torch.randn(*shape, C, device=device).to(dtype)
    # 1/sqrt(C) keeps logits O(1..3): a softmax that is neither uniform nor one-hot.
    weight = (torch.randn(V, C, device=device) * (2.0 / C**0.5)).to(dtype)
    bias = torch.randn(V, device=device).to(dtype) if use_bias else None
    labels = torch.randint(0, V, shape, device=device)
    # Make part of the labels the argmax so the accuracy is neither 0 nor 1.
    z = hidden.double().reshape(-1, C) @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    # the label at t is predicted from position t - shift
    am = torch.roll(z.argmax(-1).reshape(shape), shift, dims=len(shape) - 1)
    labels = torch.where(torch.rand(shape, device=device) < 0.4, am, labels)
    labels[torch.rand(shape, device=device) < frac_ignored] = -100
    return hidden, weight, bias, labels


CASES = [
    # shape, C, V, shift, softcap, bias, smoothing, z_loss, frac_ignored
    pytest.param((1,), 64, 123, 0, None, False, 0.0, 0.0, 0.0, id="N1"),
    pytest.param((2, 151), 96, 1000, 1, 30.0, True, 0.1, 0.0, 0.5, id="3d-shift1-softcap-bias-smooth"),
    pytest.param((300,), 64, 1000, 0, None, False, 0.0, 0.0, 0.0, id="N300-none-ignored"),
    pytest.param((3, 41), 96, 123, 1, None, True, 0.2, 1e-3, 0.3, id="zloss-smooth-bias"),
    pytest.param((5, 17), 64, 123, 1, 5.0, False, 0.0, 0.0, 0.6, id="strong-softcap"),
    pytest.param((97,), 96, 1000, 1, 15.0, True, 0.0, 1e-4, 0.8, id="2d-shift1-sparse"),
]


@pytest.mark.parametrize("strategy", ["two_pass", "two_pass-triton-fwd", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,C,V,shift,softcap,use_bias,smoothing,z_loss,frac", CASES)
def test_matches_full_logits(device, monkeypatch, dtype, shape, C, V, shift, softcap, use_bias, smoothing, z_loss, frac,
                             strategy):
    """Loss, accuracy and every gradient against fp64 full logits. Two-pass with d weight runs
    its GEMM forward (``GEMM_FORWARD``; its chunks hold ~C V / (V + C) rows here, so N > ~60
    crosses several), ``two_pass-triton-fwd`` the Triton forward kernel instead."""
    if strategy == "two_pass-triton-fwd":
        monkeypatch.setattr(mce, "GEMM_FORWARD", False)
        strategy = "two_pass"
    hidden, weight, bias, labels = _make(shape, C, V, dtype, device, frac, use_bias, shift)
    # Even-indexed cases run the two-pass backward in 256-column vocabulary chunks (several
    # launches, a partial last chunk) and the eager forward in 37-row chunks (dW accumulated
    # over them, a partial last chunk); the others in one chunk.
    if V == 1000 and shift == 1:
        monkeypatch.setattr(mce, "MAX_CHUNK_ELEMS", 1)
        monkeypatch.setattr(mce, "EAGER_CHUNK_ELEMS", 37 * V)
    kw = dict(shift=shift, softcap=softcap, label_smoothing=smoothing, z_loss=z_loss)

    with torch.no_grad():
        want, correct, near, n = _oracle(hidden, weight, labels, bias, **kw)
    params = [hidden, weight] + ([bias] if use_bias else [])
    # Two-pass: per-position losses under a random per-row upstream gradient. Eager (d weight
    # needs one factor for all rows): the summed loss under a random scalar.
    eager = strategy == "eager"
    g_up = torch.rand(() if eager else want.shape, device=device, dtype=torch.float64) + 0.5

    def run(fn, tensors, **extra):
        ts = [t.detach().clone().requires_grad_() for t in tensors]
        b = ts[2] if use_bias else None
        loss = fn(ts[0], ts[1], labels, b, reduction="sum" if eager else "none", **kw, **extra)
        (loss.double() * g_up).sum().backward()
        return loss.detach(), [t.grad for t in ts]

    mce.LAST_TILES.pop("fwd", None)
    fast, fast_g = run(mce.masked_linear_cross_entropy_triton, params, strategy=strategy)
    if strategy == "two_pass":  # which forward ran
        assert mce.LAST_TILES.get("fwd", "").startswith("gemm") == mce.GEMM_FORWARD, mce.LAST_TILES
    ref_native, ref_g = run(masked_linear_cross_entropy_ref, params, upcast=False, strategy=strategy)
    # Gradient oracle: autograd through the full fp64 logits and F.cross_entropy.
    oracle_t = [t.detach().double().requires_grad_() for t in params]
    o_loss, _, _, _ = _oracle(oracle_t[0], oracle_t[1], labels, oracle_t[2] if use_bias else None, **kw)
    if eager:
        o_loss = o_loss.sum()
        want = want.sum()
    (o_loss * g_up).sum().backward()
    oracle_g = [t.grad for t in oracle_t]

    assert fast.shape == want.shape and fast.dtype == torch.float32
    assert_close_rule(fast, want, ref_native, atol=1e-5, name="loss")
    for name, a, r, o in zip(["d hidden", "d weight", "d bias"], fast_g, ref_g, oracle_g):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert_close_rule(a, o, r, factor=3.0, atol=1e-5, name=name)

    # mean reduction and accuracy through the same kernels
    loss, acc = mce.masked_linear_cross_entropy_triton(hidden, weight, labels, bias, return_accuracy=True, **kw)
    assert_close_rule(loss, want.sum() / n, ref_native.sum() / n, atol=1e-5, name="mean loss")
    if eager:  # the eager forward's own statistics (loss and accuracy from the row kernel)
        h = hidden.clone().requires_grad_()
        loss_e, acc_e = mce.masked_linear_cross_entropy_triton(h, weight, labels, bias, return_accuracy=True,
                                                               strategy="eager", **kw)
        assert_close_rule(loss_e.detach(), want.sum() / n, ref_native.sum() / n, atol=1e-5, name="eager mean loss")
        assert abs(round(float(acc_e) * n) - correct) <= near, (float(acc_e), correct, n)
    assert acc.dtype == torch.float32 and acc.shape == ()
    assert abs(round(float(acc) * n) - correct) <= near, (float(acc), correct, n)


STORED_CASES = [
    # shape, C, V, frac_ignored, vc, max_rows, bias, softcap, smoothing, z_loss, z_in_w
    # several dW blocks (the last narrower) and T, logits in d weight's tail, 4 row chunks
    pytest.param((4, 60), 96, 1000, 0.8, 256, 16, True, None, 0.1, 1e-3, True, id="blocks-rows-in-w"),
    # N close to C: the tail is small and a large room takes the logits; one block past T
    pytest.param((2, 1000), 64, 1000, 0.97, 512, 4096, False, 20.0, 0.0, 0.0, False, id="in-room"),
    # Vt = V: every column in T (no block in d weight), odd V, several row chunks
    pytest.param((4, 70), 96, 123, 0.8, 512, 20, True, 5.0, 0.0, 0.0, None, id="all-in-t"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,C,V,frac,vc,max_rows,use_bias,softcap,smoothing,z_loss,z_in_w", STORED_CASES)
def test_stored_eager_matches_full_logits(device, monkeypatch, dtype, shape, C, V, frac, vc, max_rows, use_bias,
                                          softcap, smoothing, z_loss, z_in_w):
    """The stored eager strategy (every dz kept in d weight's buffer and hidden's room, dW
    made at the end block by block, last first): loss, accuracy and every gradient against
    fp64 full logits, buffers poisoned, the plan asserted (blocks, chunks, where the logits
    live) so the case tests what its name says."""
    monkeypatch.setattr(mce, "STORED_VC", vc)
    monkeypatch.setattr(mce, "STORED_MIN_VC", vc)
    monkeypatch.setattr(mce, "STORED_MAX_ROWS", max_rows)
    monkeypatch.setattr(mce, "EAGER_SCRATCH_MIN_ROWS", 1)
    # the chunked form in 8-row chunks of its own: stored runs wherever it applies (in one
    # chunk the chunked form would run instead, eager_stored_plan)
    monkeypatch.setattr(mce, "eager_plan", lambda *a, **k: (8, False))
    hidden, weight, bias, labels = _make(shape, C, V, dtype, device, frac, use_bias, 1)
    kw = dict(shift=1, softcap=softcap, label_smoothing=smoothing, z_loss=z_loss)
    with torch.no_grad():
        want, correct, near, n = _oracle(hidden, weight, labels, bias, **kw)
    plan = mce.stored_plan(n, V, C, hidden.numel() // C, hidden.element_size(), True)
    assert plan is not None and plan.vc == vc and z_in_w in (None, plan.z_in_w), (n, plan)
    assert (plan.vt == V) == (V == 123), plan
    assert max_rows >= n or -(-n // plan.rows) > 1, (plan, n)
    params = [hidden, weight] + ([bias] if use_bias else [])
    g_up = torch.rand((), device=device, dtype=torch.float64) + 0.5

    def run(fn, tensors, **extra):
        ts = [t.detach().clone().requires_grad_() for t in tensors]
        loss, acc = fn(ts[0], ts[1], labels, ts[2] if use_bias else None, reduction="sum", return_accuracy=True,
                       **kw, **extra)
        (loss.double() * g_up).backward()
        return loss.detach(), acc, [t.grad for t in ts]

    mce.LAST_TILES.pop("eager", None)
    fast, acc, fast_g = run(mce.masked_linear_cross_entropy_triton, params)  # "auto" takes it
    assert mce.LAST_TILES["eager"].startswith("stored"), mce.LAST_TILES
    ref_native, _, ref_g = run(masked_linear_cross_entropy_ref, params, upcast=False, strategy="eager")
    oracle_t = [t.detach().double().requires_grad_() for t in params]
    o_loss = _oracle(oracle_t[0], oracle_t[1], labels, oracle_t[2] if use_bias else None, **kw)[0].sum()
    (o_loss * g_up).backward()
    # the summed loss (~N x 7) is a few fp32 ulps of its own size from either summation order
    assert_close_rule(fast, want.sum(), ref_native, atol=1e-5 + 2**-21 * float(want.sum().abs()), name="loss")
    assert abs(round(float(acc) * n) - correct) <= near, (float(acc), correct, n)
    for name, a, r, t in zip(["d hidden", "d weight", "d bias"], fast_g, ref_g, oracle_t):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert_close_rule(a, t.grad, r, factor=3.0, atol=1e-5, name=name)


def test_stored_eager_random_layouts(device, monkeypatch):
    """Random small layouts through the stored eager strategy (vocabulary, hidden size, rows,
    labelled fraction, dW block width, rows per chunk, bias drawn; fp32): loss and every
    gradient within the rule against fp64 full logits, buffers poisoned. Bounded: 10 draws,
    at least 6 of which take the stored plan."""
    monkeypatch.setattr(mce, "EAGER_SCRATCH_MIN_ROWS", 1)
    rng = torch.Generator().manual_seed(1234)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    taken = 0
    for _ in range(10):
        C, V = pick([32, 48, 64, 96]), int(torch.randint(40, 1500, (1,), generator=rng))
        B, T = pick([1, 2, 3]), int(torch.randint(60, 260, (1,), generator=rng))
        frac = float(torch.empty(()).uniform_(0.75, 0.97, generator=rng))
        monkeypatch.setattr(mce, "STORED_VC", pick([64, 128, 256, 1024]))
        monkeypatch.setattr(mce, "STORED_MIN_VC", 64)
        monkeypatch.setattr(mce, "STORED_MAX_ROWS", pick([8, 16, 64, 4096]))
        use_bias = bool(pick([True, False]))
        hidden, weight, bias, labels = _make((B, T), C, V, torch.float32, device, frac, use_bias, 1)
        with torch.no_grad():
            want, _, _, n = _oracle(hidden, weight, labels, bias, 1, None, 0.0, 0.0)
        if mce.eager_stored_plan(n, V, C, B * T, 4, True) is None:
            continue
        taken += 1
        params = [hidden, weight] + ([bias] if use_bias else [])

        def run(fn, **extra):
            ts = [t.detach().clone().requires_grad_() for t in params]
            loss = fn(ts[0], ts[1], labels, ts[2] if use_bias else None, reduction="sum", **extra)
            loss.backward()
            return loss.detach(), [t.grad for t in ts]

        mce.LAST_TILES.pop("eager", None)
        fast, fast_g = run(mce.masked_linear_cross_entropy_triton)
        assert mce.LAST_TILES["eager"].startswith("stored"), mce.LAST_TILES
        ref_native, ref_g = run(masked_linear_cross_entropy_ref, upcast=False, strategy="eager")
        o = [t.detach().double().requires_grad_() for t in params]
        _oracle(o[0], o[1], labels, o[2] if use_bias else None, 1, None, 0.0, 0.0)[0].sum().backward()
        case = (C, V, B, T, n, mce.STORED_VC, mce.STORED_MAX_ROWS)
        assert_close_rule(fast, want.sum(), ref_native, atol=1e-5 + 2**-21 * float(want.sum().abs()), name=f"loss {case}")
        for name, a, r, t in zip(["d hidden", "d weight", "d bias"], fast_g, ref_g, o):
            assert_close_rule(a, t.grad, r, factor=3.0, atol=1e-5, name=f"{name} {case}")
    assert taken >= 6, taken


def test_row_kernel_falls_back_to_the_plain_loop(device, monkeypatch):
    """A Triton that cannot build the pipelined row kernel (ROWS_STAGES > 1): one warning, the
    plain loop from then on, and the same loss and gradients as the plain loop from the start."""
    real = mce._mce_rows_kernel
    seen = []

    class Refuses:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["STAGES"])
                if kw["STAGES"] > 1:
                    raise RuntimeError("PassManager::run failed")
                return real[grid](*args, **kw)
            return launch

    hidden, weight, _, labels = _make((2, 60), 64, 300, torch.float32, device, 0.5, False, 1)

    def grads():
        h = hidden.clone().requires_grad_()
        loss = mce.masked_linear_cross_entropy_triton(h, weight, labels, strategy="eager")
        loss.backward()
        return loss.detach(), h.grad

    want = grads()
    monkeypatch.setattr(mce, "_mce_rows_kernel", Refuses())
    monkeypatch.setattr(mce, "_ROWS_PIPELINE_FAILED", False)
    with pytest.warns(RuntimeWarning, match="pipelined loop failed to build"):
        got = grads()
    again = grads()
    assert seen[:2] == [mce.ROWS_STAGES, 1] and set(seen[2:]) == {1}, seen
    for out in (got, again):
        assert all(torch.equal(a, b) for a, b in zip(want, out))


def _stored_order_ok(N, V, C, plan) -> bool:
    """Replay the stored strategy's dW pass on an interval model of d weight's buffer: every
    dz block must still be intact when it is read (no earlier dW write reached it)."""
    _, vt, vc, _ = plan
    nb = -(-(V - vt) // vc)
    written = []  # element intervals of d weight written so far
    for j in range(nb - 1, -1, -1):
        c0 = vt + j * vc
        width = min(vc, V - c0)
        src = (j * N * vc, j * N * vc + N * width)
        dst = (c0 * C, (c0 + width) * C)
        if any(a < src[1] and src[0] < b for a, b in written + [dst]):
            return False
        written.append(dst)
    return True


def test_stored_plan_layout():
    """The stored plan for LM shapes and small ones: regions inside their buffers and apart,
    the write order safe (replayed), chunks within the room, and None where it cannot apply
    (N > C, no d hidden, no room)."""
    seen = 0
    for C in (64, 96, 576, 2048, 4096):
        for V in (123, 1000, 32000, 49152, 128256, 151936):
            for tokens in (300, 4096, 16384):
                for frac in (0.03, 0.15, 0.2, 0.5, 1.0):
                    N = max(1, int(tokens * frac))
                    for itemsize in (2, 4):
                        plan = mce.stored_plan(N, V, C, tokens, itemsize, True)
                        if plan is None:
                            continue
                        seen += 1
                        R, vt, vc, z_in_w = plan
                        assert N <= C and vc & (vc - 1) == 0 and vt % 8 == 0 or vt == V, plan
                        assert vt == V or vt * C >= N * vc, plan
                        per_z = (4 // itemsize) * V
                        room = (tokens - mce._scratch_row0(N)) * C
                        h_end = mce._aligned(N * C, itemsize)
                        t_end = h_end + mce._aligned(N * vt, itemsize)
                        d_end = mce._aligned(N * (V - vt), itemsize)
                        assert t_end <= room
                        if z_in_w:
                            assert d_end + min(R, N) * per_z <= V * C, plan
                        else:
                            assert t_end + min(R, N) * per_z <= room, plan
                        assert R >= min(N, mce.EAGER_SCRATCH_MIN_ROWS)
                        assert _stored_order_ok(N, V, C, plan), (N, V, C, plan)
    assert seen > 50
    # the benchmark's shapes (16k tokens, 20% labelled, C = 4096, bf16) all take it
    for V, N in ((32000, 3331), (128256, 3288), (151936, 3262)):
        plan = mce.stored_plan(N, V, 4096, 16384, 2, True)
        assert plan is not None and plan.rows >= 256, (V, plan)
    assert mce.stored_plan(5000, 32000, 4096, 16384, 2, True) is None  # N > C
    assert mce.stored_plan(3000, 32000, 4096, 16384, 2, False) is None  # no d hidden, no room
    assert mce.stored_plan(3000, 32000, 4096, 3100, 2, True) is None  # almost every row labelled
    # the replay catches an unsafe layout: T too narrow
    assert not _stored_order_ok(3000, 32000, 4096, mce.StoredPlan(256, 8, 4096, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sum_reduction_and_public_op(device, dtype):
    hidden, weight, bias, labels = _make((2, 33), 64, 123, dtype, device, 0.4, True)
    with torch.no_grad():
        want, _, _, n = _oracle(hidden, weight, labels, bias, 1, None, 0.0, 0.0)
    ref_native = masked_linear_cross_entropy_ref(hidden, weight, labels, bias, reduction="sum", upcast=False)
    got = L.masked_linear_cross_entropy(hidden, weight, labels, bias, reduction="sum", backend="triton")
    assert_close_rule(got, want.sum(), ref_native, atol=1e-4, name="sum loss")
    # int32 labels give the same answer
    got32 = L.masked_linear_cross_entropy(hidden, weight, labels.int(), bias, reduction="sum", backend="triton")
    assert float(got32) == pytest.approx(float(got), rel=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(device, reduction):
    h = torch.randn(2, 9, 64, device=device, requires_grad=True)
    w = torch.randn(123, 64, device=device, requires_grad=True)
    b = torch.randn(123, device=device, requires_grad=True)
    y = torch.full((2, 9), -100, device=device)
    y[:, 0] = 5  # only position 0 is labelled, and shift=1 drops it
    loss, acc = mce.masked_linear_cross_entropy_triton(h, w, y, b, reduction=reduction, return_accuracy=True)
    assert torch.isfinite(loss).all() and float(loss.detach().abs().sum()) == 0.0
    assert float(acc) == 0.0
    loss.sum().backward()
    for t in (h, w, b):
        assert t.grad is not None and torch.isfinite(t.grad).all() and float(t.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind,frozen_bias", [("nan-inf", False), ("fp16-overflow", True)])
def test_all_ignored_reads_no_values(device, kind, frozen_bias, reduction):
    """Every label ignored while hidden / weight / bias hold NaN / inf, or finite fp16 values
    whose sums overflow: loss exactly 0, exact-zero gradients (the 0 is not built from the
    values). The checks: test_reference_masked_ce.check_all_ignored."""
    from test_reference_masked_ce import check_all_ignored

    check_all_ignored("triton", kind, reduction, frozen_bias, device)


@pytest.mark.parametrize("ac_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["frozen-head", "hidden-no-grad"])
def test_autocast_own_buffer_eager(device, ac_dtype, case):
    """Under torch.autocast (HF Trainer bf16=True / fp16=True with fp32 weights) the op's host
    GEMMs run with autocast off, so the kernels see what they see without autocast and loss
    and gradients equal the no-autocast ones. The cases are the eager plans whose logits chunk
    is a buffer of its own (``_logits_fp32`` without ``out=``, which autocast lowered to 16
    bits and whose following GEMM into an fp32 buffer then failed): a frozen head on a mostly
    labelled batch (no room in hidden's gradient), and hidden not requiring grad with a
    trainable head (no gradient buffer to work in)."""
    hidden, weight, _, labels = _make((4, 60), 64, 300, torch.float32, device, 0.05, False)
    req_h, req_w = (True, False) if case == "frozen-head" else (False, True)
    out = []
    for ac in (False, True):
        mce.LAST_TILES.pop("eager", None)
        ts = [hidden.clone().requires_grad_(req_h), weight.clone().requires_grad_(req_w)]
        with torch.autocast(device.type, dtype=ac_dtype, enabled=ac):
            loss = L.masked_linear_cross_entropy(ts[0], ts[1], labels, backend="triton")  # strategy auto
            loss.backward()
        assert mce.LAST_TILES.get("eager", "").endswith("own buffer"), mce.LAST_TILES.get("eager")
        out.append([loss.detach()] + [t.grad for t in ts if t.requires_grad])
    for name, a, c in zip(("loss", "grad"), *out):
        assert a.dtype == c.dtype and torch.isfinite(c).all(), name
        assert (a - c).abs().max() <= 1e-6 * max(1.0, float(a.abs().max())), name


def test_frozen_weight_skips_its_gradient(device):
    hidden, weight, _, labels = _make((2, 20), 64, 123, torch.float32, device, 0.3, False)
    h = hidden.clone().requires_grad_()
    loss = mce.masked_linear_cross_entropy_triton(h, weight, labels)
    loss.backward()
    h2 = hidden.clone().requires_grad_()
    masked_linear_cross_entropy_ref(h2, weight, labels).backward()
    assert weight.grad is None
    assert (h.grad - h2.grad).abs().max() < 1e-5


def test_eager_rows_even_and_aligned():
    """Chunk rows (the GEMMs' M): every row when they fit, else evened out over the fewest
    chunks and aligned to EAGER_ROW_ALIGN, never over the memory bound."""
    A = mce.EAGER_ROW_ALIGN
    assert mce.eager_rows(3277, 32000) == 512 and mce.eager_rows(3277, 128256) == 128  # 7 / 26 chunks
    assert mce.eager_rows(100, 32000) == 100 and mce.eager_rows(0, 32000) == 1
    for V in (123, 1000, 32000, 49152, 128256, 151936, 300_000):
        r_max = mce.eager_row_chunk(V)
        for N in (1, 63, 64, 65, r_max, r_max + 1, 2 * r_max + 7, 3277, 16384, 32768):
            r = mce.eager_rows(N, V)
            assert 1 <= r <= max(r_max, 1), (N, V, r)
            if N <= r_max:
                assert r == max(N, 1)
            elif r_max >= A:
                assert r % A == 0, (N, V, r)
                # never more chunks than the largest aligned chunk would make
                assert -(-N // r) <= -(-N // (r_max // A * A)), (N, V, r)
            else:
                assert r == r_max


def test_strategy_choice(monkeypatch):
    """auto: eager for a frozen head; with d weight eager for one chunk, or for at most
    EAGER_MAX_W_CHUNKS chunks of at least EAGER_MIN_W_ROWS rows (the H200 measurements:
    V = 32000 eager, V = 128256 two-pass at 16k tokens x 20%); EAGER_AUTO off: two-pass."""
    V = 32000
    assert mce.EAGER_AUTO  # on since the H200 run (benchmarks/results/masked_ce.jsonl)
    monkeypatch.setattr(mce, "EAGER_AUTO", False)
    assert mce.choose_strategy("auto", 100, V, False, True) == "two_pass"
    assert mce.choose_strategy("eager", 100, V, False, True) == "eager"
    monkeypatch.setattr(mce, "EAGER_AUTO", True)
    r = mce.eager_row_chunk(V)
    assert r * V <= mce.EAGER_CHUNK_ELEMS < (r + 1) * V
    assert r >= mce.EAGER_MIN_W_ROWS
    assert mce.choose_strategy("auto", 100_000, V, False, False) == "eager"  # d hidden scales per row
    assert mce.choose_strategy("auto", 3277, V, True, True) == "eager"  # the benchmark's case: 7 chunks
    ra = r // mce.EAGER_ROW_ALIGN * mce.EAGER_ROW_ALIGN  # the aligned chunk
    assert mce.choose_strategy("auto", ra * mce.EAGER_MAX_W_CHUNKS, V, True, True) == "eager"
    assert mce.choose_strategy("auto", ra * mce.EAGER_MAX_W_CHUNKS + 1, V, True, True) == "two_pass"
    big = 128256  # chunks of 130 rows: eager only while the rows fit in one chunk
    rb = mce.eager_row_chunk(big)
    assert rb < mce.EAGER_MIN_W_ROWS
    assert mce.choose_strategy("auto", rb, big, True, True) == "eager"
    assert mce.choose_strategy("auto", rb + 1, big, True, True) == "two_pass"
    assert mce.choose_strategy("auto", 3277, big, True, True) == "two_pass"
    assert mce.choose_strategy("auto", 3277, big, False, True) == "eager"
    assert mce.choose_strategy("eager", 100_000, V, True, True) == "eager"
    assert mce.choose_strategy("auto", 10, V, True, False) == "two_pass"  # reduction 'none' with d weight
    assert mce.choose_strategy("two_pass", 10, V, False, True) == "two_pass"
    with pytest.raises(ValueError, match="strategy"):
        mce.choose_strategy("eager", 10, V, True, False)
    # without an fp32-output GEMM (16-bit CUDA inputs on a torch that lacks it) eager cannot run
    assert mce.choose_strategy("auto", 10, V, False, True, fp32_logits=False) == "two_pass"
    with pytest.raises(ValueError, match="out_dtype"):
        mce.choose_strategy("eager", 10, V, False, True, fp32_logits=False)
    assert mce.fp32_logits_available(torch.zeros(1, dtype=torch.float16))  # CPU: upcast operands


def test_eager_wide_row_blocks(device, monkeypatch):
    """The GPU's large-vocabulary row-kernel shape (8192 columns, 16 warps) run here: a full
    block and a tail per row, the same loss and gradients as the two-pass strategy."""
    assert mce._rows_block(mce.ROWS_WIDE_V, True) == (8192, 16)
    assert mce._rows_block(32000, True) == (4096, 8) and mce._rows_block(70000, False) == (1024, 4)
    hidden, weight, bias, labels = _make((2, 9), 64, 9000, torch.float32, device, 0.3, True)
    out = {}
    for strategy in ("two_pass", "eager"):
        if strategy == "eager":
            monkeypatch.setattr(mce, "_rows_block", lambda V, on_cuda: (8192, 16))
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        loss = mce.masked_linear_cross_entropy_triton(h, w, labels, b, label_smoothing=0.1, strategy=strategy)
        out[strategy] = (loss, *torch.autograd.grad(loss, (h, w, b)))
    for a, b_ in zip(out["two_pass"], out["eager"]):
        assert (a - b_).abs().max() <= 1e-5 * max(1.0, float(a.detach().abs().max())), (a, b_)


def _spy(monkeypatch, names):
    calls = {n: 0 for n in names}
    for n in names:
        real = getattr(mce, n)

        def wrapped(*a, _real=real, _n=n, **k):
            calls[_n] += 1
            return _real(*a, **k)

        monkeypatch.setattr(mce, n, wrapped)
    return calls


@pytest.mark.parametrize("frozen", [False, True], ids=["d-weight", "frozen-head"])
def test_eager_makes_logits_once(device, monkeypatch, frozen):
    """Eager: one logits GEMM per row chunk in the forward, none in the backward; two-pass: the
    statistics forward (the GEMM forward's chunks with d weight, else the Triton kernel) and
    the recomputing backward. Both give the same gradients."""
    monkeypatch.setattr(mce, "EAGER_CHUNK_ELEMS", 16 * 123)  # 16-row chunks
    hidden, weight, bias, labels = _make((2, 30), 64, 123, torch.float32, device, 0.2, True)
    calls = _spy(monkeypatch, ["_logits_fp32", "masked_ce_forward", "masked_ce_backward"])
    grads = {}
    for strategy in ("eager", "two_pass"):
        for k in calls:
            calls[k] = 0
        ts = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen), bias.clone().requires_grad_()]
        loss = mce.masked_linear_cross_entropy_triton(ts[0], ts[1], labels, ts[2], strategy=strategy)
        loss.backward()
        grads[strategy] = [t.grad for t in ts]
        n = int((labels[:, 1:] != -100).sum())
        if strategy == "eager":
            assert calls == {"_logits_fp32": -(-n // 16), "masked_ce_forward": 0, "masked_ce_backward": 0}, calls
        elif frozen:
            assert calls == {"_logits_fp32": 0, "masked_ce_forward": 1, "masked_ce_backward": 1}, calls
        else:  # with d weight the statistics come from the GEMM forward's chunks
            chunks = -(-n // mce.gemm_forward_rows(n, 123, 64, 4))
            assert calls == {"_logits_fp32": chunks, "masked_ce_forward": 0, "masked_ce_backward": 1}, calls
    for a, b in zip(grads["eager"], grads["two_pass"]):
        assert (a is None) == (b is None) and (a is None or (a - b).abs().max() < 1e-5)
    assert (grads["eager"][1] is None) == frozen


@pytest.mark.parametrize("n_rows,N,block,layout", [
    (50, 1, 1, "random"), (50, 17, 4, "random"), (50, 17, 17, "random"), (50, 17, 100, "random"),
    (50, 50, 7, "random"), (64, 10, 3, "last"), (64, 10, 4, "first"), (300, 97, 16, "random"),
    # the kernel (block None): one program per 64 columns, 256-row steps, last first
    (50, 17, None, "random"), (64, 10, None, "last"), (64, 10, None, "first"), (50, 50, None, "random"),
    (700, 300, None, "random"), (700, 600, None, "random"), (1100, 513, None, "dense-tail"),
])
@pytest.mark.parametrize("C", [5, 64, 130])
@pytest.mark.parametrize("zero", [True, False], ids=["zero", "keep-others"])
def test_place_rows(device, n_rows, N, block, layout, C, zero):
    """Rows [0, N) land on h_index (strictly increasing, h_index[i] >= i), every other row is
    zero (``zero``; else what the move left there): the in-place move the eager forward ends
    with, by the kernel (``block`` None: whole 256-row steps, a partial one, column blocks
    past C) and by the copied-block loop."""
    g = torch.Generator().manual_seed(n_rows * 31 + N + C)
    if layout == "first":
        idx = torch.arange(N)
    elif layout == "last":
        idx = torch.arange(n_rows - N, n_rows)
    elif layout == "dense-tail":  # the first rows in place, then every other row: long chains of moves
        idx = torch.cat([torch.arange(N - 257), torch.arange(N - 257, n_rows, 2)[:257]])
    else:
        idx = torch.randperm(n_rows, generator=g)[:N].sort().values
    idx = idx.to(device)
    rows = torch.randn(N, C, generator=g).to(device)
    buf = torch.randn(n_rows, C, generator=g).to(device) * 1e3  # stale data: the logits chunks were here
    buf[:N] = rows
    mce._place_rows(buf, idx, block, zero=zero)
    want = torch.zeros(n_rows, C, device=device)
    want[idx] = rows
    if zero:
        assert torch.equal(buf, want)
    else:
        assert torch.equal(buf[idx], rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rows,cols,per_row", [(1, 1, False), (37, 29, False), (37, 29, True), (131, 67, True), (131, 67, False)])
@pytest.mark.parametrize("keep", [False, True], ids=["all-rows", "keep"])
def test_scale_matches_mul(device, dtype, rows, cols, per_row, keep):
    """scale_ (the eager backward's upstream-gradient scaling) rounds as x.mul_(g) does: x in
    fp32 times g, once to x's dtype; per-row factors and sizes past one block (4096) included.
    With ``keep`` the other rows become 0 even where they held NaN or inf (the eager forward
    leaves them unwritten)."""
    x = torch.randn(rows, cols, device=device).to(dtype)
    g = (torch.rand(rows, device=device) * 3 - 1) if per_row else torch.rand((), device=device) / 7
    want = x.clone().mul_(g[:, None] if per_row else g)
    kept = None
    if keep:
        kept = torch.rand(rows, device=device) < 0.6
        kept[0] = rows > 1  # a dropped row, unless it is the only one
        x[~kept] = float("nan")
        x[~kept, :1] = float("inf")
        want[~kept] = 0
    got = mce.scale_(x, g, kept)
    assert got is x
    if dtype == torch.bfloat16 and not x.is_cuda:
        # Triton's interpreter casts fp32 to bf16 by truncation (the GPU rounds to nearest even):
        # within one bf16 step of the product here, exact on a GPU
        step = want.float().abs() * 2.0**-7
        assert ((x.float() - want.float()).abs() <= step).all()
    else:
        assert torch.equal(x, want)


def test_scale_rejects_bad_input(device):
    x = torch.randn(8, 6, device=device)
    with pytest.raises(ValueError, match="x: expected a contiguous"):
        mce.scale_(x.t(), torch.ones((), device=device))
    with pytest.raises(ValueError, match=r"g: expected a 0-d tensor or shape \(8,\)"):
        mce.scale_(x, torch.ones(6, device=device))
    with pytest.raises(ValueError, match=r"keep: expected a bool or uint8 tensor of shape \(8,\)"):
        mce.scale_(x, torch.ones((), device=device), torch.ones(8, device=device))


@pytest.mark.parametrize("N,V,C,itemsize", [(3331, 128256, 4096, 2), (3331, 32000, 4096, 2), (100, 1000, 64, 4),
                                          (5, 50, 8, 2), (10000, 151936, 4096, 2)])
def test_gemm_forward_rows_stay_under_d_weight(N, V, C, itemsize):
    """The GEMM forward's chunk (fp32 logits + gathered rows) never outgrows d weight, which the
    backward allocates anyway; all rows in one chunk when they fit."""
    R = mce.gemm_forward_rows(N, V, C, itemsize)
    assert 1 <= R <= N
    assert min(N, R) * (4 * V + C * itemsize) <= V * C * itemsize or R < mce.EAGER_ROW_ALIGN, R
    if N * (4 * V + C * itemsize) <= V * C * itemsize:
        assert R == N


def test_eager_plan():
    """The logits chunks go into hidden's gradient buffer when its unlabelled rows hold at
    least min(N, the separate buffer's chunk, EAGER_SCRATCH_MIN_ROWS) rows, and then take all
    the room; the acceptance shape (C = 4096, bf16, 16k tokens, 3277 labelled rows)."""
    row = 4096 * 2
    assert mce.eager_plan(3277, 32000, 16384, row, True) == (704, True)  # 5 chunks (7 of 512 separately)
    assert mce.eager_plan(3277, 128256, 16384, row, True) == (192, True)  # 18 chunks (26 of 128)
    assert mce.eager_plan(3277, 151936, 16384, row, True) == (128, True)  # 26 chunks (52 of 64)
    assert mce.eager_plan(3277, 32000, 16384, row, False) == (512, False)  # no d hidden: no buffer to use
    assert mce.eager_plan(3277, 32000, 16384, row, True, in_grad_ok=False) == (512, False)
    # 4k tokens: room for 209 rows at V = 32000, less than 256 and than the separate 448
    assert mce.eager_plan(820, 32000, 4096, row, True) == (448, False)
    # every row labelled: no room at all
    assert mce.eager_plan(100, 123, 100, 256, True) == (100, False)
    # rows that fit in the room whole
    r, in_grad = mce.eager_plan(100, 123, 2000, 256, True)
    assert in_grad and r == 100
    for N, V, n_rows in ((3277, 32000, 16384), (3277, 128256, 16384), (1000, 5000, 3000)):
        r, in_grad = mce.eager_plan(N, V, n_rows, row, True)
        if in_grad:  # the chunk's logits and rows fit past the labelled rows' gradients
            assert (mce._scratch_row0(N) * row) + r * (V * 4 + row) + 16 <= n_rows * row


def test_grad_chunk_ends():
    """In-gradient eager chunks: they cover the labelled rows in order, each one's fp32 logits
    and gathered rows fit between its own gradient rows (rounded up to 16) and the buffer's
    end, none is smaller than the fixed plan's chunk (but the last), and there are never more
    of them; at C = 4096, 16k tokens, V = 151936 the early chunks are larger (192 rows)."""
    seen = 0
    for C, itemsize in ((4096, 2), (576, 2), (96, 4), (64, 2)):
        rb = C * itemsize
        for V in (123, 1000, 32000, 128256, 151936):
            for n_rows in (300, 4096, 16384):
                for N in (1, 37, n_rows // 5, n_rows // 2, n_rows - 40):
                    base, in_grad = mce.eager_plan(N, V, n_rows, rb, True)
                    if not in_grad:
                        continue
                    seen += 1
                    ends = mce.grad_chunk_ends(N, V, n_rows, rb, base)
                    starts = [0] + ends[:-1]
                    assert ends[-1] == N and all(b > a for a, b in zip(starts, ends)), ends
                    assert len(ends) <= -(-N // base), (N, V, n_rows, base, ends)
                    for a, b in zip(starts, ends):
                        assert b - a >= base or b == N, (a, b, base)
                        z0 = mce._scratch_row0(b) * C
                        h0 = mce._aligned(z0 + (b - a) * V * (4 // itemsize), itemsize)
                        assert h0 + (b - a) * C <= n_rows * C, (N, V, n_rows, a, b)
    assert seen > 40
    base, _ = mce.eager_plan(3262, 151936, 16384, 8192, True)
    ends = mce.grad_chunk_ends(3262, 151936, 16384, 8192, base)
    sizes = [b - a for a, b in zip([0] + ends[:-1], ends)]
    assert base == 128 and sizes[:10] == [192] * 10 and len(ends) < -(-3262 // 128), sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("frozen,reduction", [(False, "mean"), (False, "none"), (True, "none"), (True, "sum")])
def test_in_grad_matches_separate(device, monkeypatch, dtype, frozen, reduction):
    """Both strategies working inside hidden's gradient buffer (eager: several row chunks;
    two-pass: several vocabulary chunks; rows moved into place at the end, unlabelled rows
    zeroed over the poisoned buffer) give what they give with buffers of their own."""
    V, C = 1000, 96
    monkeypatch.setattr(mce, "EAGER_SCRATCH_MIN_ROWS", 1)
    monkeypatch.setattr(mce, "EAGER_CHUNK_ELEMS", 5 * V)  # separate buffer: 5-row chunks
    hidden, weight, bias, labels = _make((4, 100), C, V, dtype, device, 0.9, True)
    n = int((labels[:, 1:] != -100).sum())
    rows, in_grad = mce.eager_plan(n, V, 400, C * hidden.element_size(), True)
    vc = mce.two_pass_plan(n, V, 400, C, hidden.element_size(), True)
    assert in_grad and -(-n // rows) >= 2 and SPLIT_ALIGN <= vc < V, (n, rows, vc)  # several chunks either way
    g_up = torch.rand(4, 99, device=device) + 0.5
    placed = _spy(monkeypatch, ["_place_rows"])
    strategies = ["two_pass"] if (reduction == "none" and not frozen) else ["eager", "two_pass"]
    out = {}
    for strategy in strategies:
        for mode in (True, False):
            monkeypatch.setattr(mce, "IN_GRAD", mode)
            placed["_place_rows"] = 0
            ts = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen),
                  bias.clone().requires_grad_(not frozen)]
            loss = mce.masked_linear_cross_entropy_triton(ts[0], ts[1], labels, ts[2], reduction=reduction,
                                                          strategy=strategy)
            (loss * g_up if reduction == "none" else loss).sum().backward()
            assert placed["_place_rows"] == int(mode), (strategy, mode)
            out[strategy, mode] = [loss.detach()] + [t.grad for t in ts]
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    first = out[strategies[0], True]
    for key, other in out.items():
        for name, a, b in zip(["loss", "d hidden", "d weight", "d bias"], first, other):
            assert (a is None) == (b is None), name
            if a is not None:
                assert torch.isfinite(b).all(), (key, name)
                err = (a.float() - b.float()).abs().max()
                assert err <= tol * max(1.0, float(a.float().abs().max())), (key, name, float(err))
    # rows of hidden that predict no label (the last of each sequence, the unlabelled ones): 0
    predicts = torch.zeros(4, 100, dtype=torch.bool, device=device)
    predicts[:, :-1] = labels[:, 1:] != -100
    for strategy in strategies:
        dh = out[strategy, True][1]
        assert (dh[~predicts] == 0).all() and (dh[predicts] != 0).any(), strategy


def test_eager_second_backward_recomputes(device, monkeypatch):
    """retain_graph: the first backward takes the forward's gradients, a second one recomputes
    them (two-pass) with its own upstream gradient."""
    hidden, weight, _, labels = _make((2, 25), 64, 123, torch.float32, device, 0.3, False)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = mce.masked_linear_cross_entropy_triton(h, w, labels, strategy="eager")
    calls = _spy(monkeypatch, ["masked_ce_backward"])
    g1 = torch.autograd.grad(loss, (h, w), retain_graph=True)
    assert calls["masked_ce_backward"] == 0
    g2 = torch.autograd.grad(loss * 3.0, (h, w))
    assert calls["masked_ce_backward"] == 1
    for a, b in zip(g1, g2):
        assert (3.0 * a - b).abs().max() < 1e-5 * max(1.0, float(b.abs().max()))


def test_eager_none_reduction_with_frozen_head(device):
    """reduction='none' scales d hidden row by row: eager works for a frozen head."""
    hidden, weight, _, labels = _make((3, 20), 64, 123, torch.float32, device, 0.3, False)
    g_up = torch.rand(3, 19, device=device) + 0.5
    out = []
    for strategy in ("eager", "two_pass"):
        h = hidden.clone().requires_grad_()
        loss = mce.masked_linear_cross_entropy_triton(h, weight, labels, reduction="none", strategy=strategy)
        (loss * g_up).sum().backward()
        out.append((loss.detach(), h.grad))
    assert (out[0][0] - out[1][0]).abs().max() < 1e-5 and (out[0][1] - out[1][1]).abs().max() < 1e-6


def test_public_op_rejects_bad_strategy(device):
    h = torch.randn(2, 9, 64, device=device)
    w = torch.randn(123, 64, device=device, requires_grad=True)
    y = torch.randint(0, 123, (2, 9), device=device)
    with pytest.raises(ValueError, match="strategy"):
        L.masked_linear_cross_entropy(h, w, y, strategy="fast", backend="triton")
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="strategy: 'eager'.*reduction"):
            L.masked_linear_cross_entropy(h, w, y, reduction="none", strategy="eager", backend=backend)
    # without gradients there is nothing to be eager about
    with torch.no_grad():
        L.masked_linear_cross_entropy(h, w, y, reduction="none", strategy="eager", backend="triton")


def test_rows_scale_with_labelled_tokens(device, monkeypatch):
    """Only labelled rows reach the kernels: N passed to the forward equals the labelled count."""
    seen = []
    real = mce.masked_ce_forward

    def spy(h, *a):
        seen.append(h.shape[0])
        return real(h, *a)

    monkeypatch.setattr(mce, "masked_ce_forward", spy)
    hidden, weight, _, labels = _make((3, 40), 64, 123, torch.float32, device, 0.8, False)
    mce.masked_linear_cross_entropy_triton(hidden, weight, labels)
    assert seen == [int((labels[:, 1:] != -100).sum())]


def test_split_choice_covers_vocab():
    """Forward splits tile [0, V) exactly with non-empty, 256-aligned pieces."""
    dev = torch.device("cpu")
    for N in (1, 100, 300, 5000):
        for V in (1, 123, 1000, 32000, 151936):
            S, cols = mce._choose_splits(N, V, dev)
            assert 1 <= S <= mce.MAX_SPLITS and cols % mce.SPLIT_ALIGN == 0
            assert (S - 1) * cols < V <= S * cols


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=8, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 3), T=st.integers(2, 40), C=st.sampled_from([16, 48, 64]), V=st.integers(2, 400),
    shift=st.sampled_from([0, 1]), softcap=st.sampled_from([None, 3.0]), smoothing=st.sampled_from([0.0, 0.15]),
    frac=st.floats(0.0, 0.95), use_bias=st.booleans(),
)
def test_hypothesis_shapes_and_options(device, B, T, C, V, shift, softcap, smoothing, frac, use_bias):
    """Random small shapes (V down to 2, a single labelled row, odd C) keep the fp32 rule."""
    hidden, weight, bias, labels = _make((B, T), C, V, torch.float32, device, frac, use_bias, shift)
    kw = dict(shift=shift, softcap=softcap, label_smoothing=smoothing, z_loss=0.0)
    ts = [t.clone().requires_grad_() for t in ([hidden, weight] + ([bias] if use_bias else []))]
    loss = mce.masked_linear_cross_entropy_triton(ts[0], ts[1], labels, ts[2] if use_bias else None, reduction="sum", **kw)
    o = [t.detach().double().requires_grad_() for t in ts]
    want, _, _, n = _oracle(o[0], o[1], labels, o[2] if use_bias else None, **kw)
    want = want.sum()
    if n == 0:
        assert float(loss.detach()) == 0.0
        return
    loss.backward()
    want.backward()
    r = [t.detach().clone().requires_grad_() for t in ts]
    ref = masked_linear_cross_entropy_ref(r[0], r[1], labels, r[2] if use_bias else None, reduction="sum", upcast=False, **kw)
    ref.backward()
    assert_close_rule(loss, want, ref, atol=1e-4, name="loss")
    for a, b, c in zip(ts, o, r):
        assert_close_rule(a.grad, b.grad, c.grad, factor=3.0, atol=1e-5, name="grad")

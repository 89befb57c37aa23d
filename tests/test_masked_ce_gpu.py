"""Masked linear cross-entropy on the GPU: compiled kernels, bf16 included, acceptance shapes.

Correctness follows STYLE.md's rule against full fp64 logits through F.cross_entropy, with
the budget set by the chunked reference run in the input dtype. Speed is shown by
benchmarks/bench_masked_ce.py, never here; memory and host synchronisation are checked.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_rule
from llm2vec_fast.kernels.reference import labelled_rows, masked_linear_cross_entropy_ref

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _inputs(B, T, C, V, dtype, frac, use_bias, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(B, T, C, device="cuda", generator=g).to(dtype)
    w = (torch.randn(V, C, device="cuda", generator=g) * (2.0 / C**0.5)).to(dtype)
    b = torch.randn(V, device="cuda", generator=g).to(dtype) if use_bias else None
    y = torch.randint(0, V, (B, T), device="cuda", generator=g)
    y[torch.rand(B, T, device="cuda", generator=g) >= frac] = -100
    return h, w, b, y


def _oracle(h, w, y, b, shift, softcap, label_smoothing, z_loss):
    """fp64 full logits + F.cross_entropy: per-position loss (0 where ignored), shifted label shape."""
    hs, ys = (h[:, :-shift], y[:, shift:]) if shift else (h, y)
    z = hs.reshape(-1, hs.shape[-1]) @ w.t()
    if b is not None:
        z = z + b
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    yy = ys.reshape(-1)
    loss = F.cross_entropy(z, yy, ignore_index=-100, label_smoothing=label_smoothing, reduction="none")
    keep = yy != -100
    if z_loss:
        loss = loss + torch.where(keep, z_loss * torch.logsumexp(z, -1) ** 2, 0.0)
    top2 = z[keep].topk(2, dim=-1).values
    correct = int((z[keep].argmax(-1) == yy[keep]).sum())
    near = int(((top2[:, 0] - top2[:, 1]) < 1e-2).sum())
    return loss.reshape(ys.shape), correct, near, int(keep.sum())


def _check(B, T, C, V, dtype, frac, use_bias, kw, seed=0, strategy="two_pass", repeats=1):
    """Two-pass: per-position losses under a random per-row upstream gradient; eager (d weight
    needs one factor for all rows): the summed loss under a random scalar. ``repeats`` runs
    the fast path several times (a race in the eager row kernel's in-place dz would show)."""
    from llm2vec_fast.kernels.triton.masked_ce import masked_linear_cross_entropy_triton

    h, w, b, y = _inputs(B, T, C, V, dtype, frac, use_bias, seed)
    params = [h, w] + ([b] if use_bias else [])
    T_out = T - kw["shift"]
    eager = strategy == "eager"
    g_up = torch.rand(() if eager else (B, T_out), device="cuda", dtype=torch.float64) + 0.5

    def run(fn, ts, **extra):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        loss = fn(ts[0], ts[1], y, ts[2] if use_bias else None, reduction="sum" if eager else "none", **kw,
                  strategy=strategy, **extra)
        grads = torch.autograd.grad((loss.double() * g_up).sum(), ts)
        return loss.detach(), grads

    runs = [run(masked_linear_cross_entropy_triton, params) for _ in range(repeats)]
    ref_native, ref_g = run(masked_linear_cross_entropy_ref, params, upcast=False)
    o = [t.detach().double().requires_grad_() for t in params]
    want, correct, near, n = _oracle(o[0], o[1], y, o[2] if use_bias else None, **kw)
    if eager:
        want = want.sum()
    oracle_g = torch.autograd.grad((want * g_up).sum(), o)
    want = want.detach()
    for fast, fast_g in runs:
        _assert_rule(fast, fast_g, want, oracle_g, ref_native, ref_g, dtype)
    if eager:
        return
    ref_native = ref_native.sum()
    want = want.sum()

    loss, acc = masked_linear_cross_entropy_triton(h, w, y, b, return_accuracy=True, **kw)
    assert_close_rule(loss, want / n, ref_native / n, atol=1e-5, name="mean loss")
    assert abs(round(float(acc) * n) - correct) <= near


def _assert_rule(fast, fast_g, want, oracle_g, ref_native, ref_g, dtype):
    assert_close_rule(fast, want, ref_native, atol=1e-5, name="loss")
    for name, a, r, og in zip(["d hidden", "d weight", "d bias"], fast_g, ref_g, oracle_g):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert_close_rule(a, og, r, factor=3.0, atol=1e-5, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    "B,T,C,V,frac,use_bias,kw",
    [
        (4, 257, 256, 5003, 0.2, False, dict(shift=1, softcap=None, label_smoothing=0.0, z_loss=0.0)),
        (2, 300, 200, 32000, 0.5, True, dict(shift=1, softcap=30.0, label_smoothing=0.1, z_loss=1e-4)),
        (1, 1000, 576, 4099, 1.0, True, dict(shift=0, softcap=None, label_smoothing=0.0, z_loss=0.0)),
    ],
    ids=["plain", "all-options-maskK", "smollm-width-all-labelled"],
)
@pytest.mark.parametrize("strategy", ["two_pass", "eager"])
def test_gpu_matches_full_logits(dtype, B, T, C, V, frac, use_bias, kw, strategy):
    _check(B, T, C, V, dtype, frac, use_bias, kw, strategy=strategy)


@pytest.mark.parametrize("strategy", ["two_pass", "eager", "eager-chunked"])
def test_gpu_acceptance_shape_bf16(strategy, monkeypatch):
    """C = 4096, V = 32000, 4096 tokens, 20% labelled, bf16: the benchmark's shape family;
    eager three times over: stored (dz kept, dW made once; one 819-row chunk here) and
    chunked (EAGER_STORED off: dW accumulated over the row chunks, dz written over the fp32
    logits)."""
    from llm2vec_fast.kernels.triton import masked_ce as mce

    if strategy == "eager-chunked":
        monkeypatch.setattr(mce, "EAGER_STORED", False)
        strategy = "eager"
    mce.LAST_TILES.pop("eager", None)
    _check(8, 512, 4096, 32000, torch.bfloat16, 0.2, False, dict(shift=1, softcap=None, label_smoothing=0.0, z_loss=0.0),
           strategy=strategy, repeats=3 if strategy == "eager" else 1)
    if strategy == "eager":
        assert mce.LAST_TILES["eager"].startswith("stored") == mce.EAGER_STORED, mce.LAST_TILES


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_gpu_stored_eager_blocks_and_chunks(dtype, monkeypatch):
    """The stored eager strategy with many dW blocks (V = 69961: the row kernel's 16-warp,
    8192-column blocks straddle several 1024-column dW blocks) and several row chunks,
    bias, smoothing and z-loss on, three times over; the plan asserted."""
    from llm2vec_fast.kernels.triton import masked_ce as mce

    monkeypatch.setattr(mce, "STORED_VC", 1024)
    monkeypatch.setattr(mce, "STORED_MAX_ROWS", 128)
    monkeypatch.setattr(mce, "EAGER_SCRATCH_MIN_ROWS", 64)
    B, T, C, V = 4, 512, 1024, 69961
    y = _inputs(B, T, C, V, dtype, 0.15, True)[3]
    n = int((y[:, 1:] != -100).sum())
    plan = mce.eager_stored_plan(n, V, C, B * T, torch.finfo(dtype).bits // 8, True)
    assert plan is not None and plan.vc == 1024 and plan.rows <= 128 < n and plan.vt < V, plan
    mce.LAST_TILES.pop("eager", None)
    _check(B, T, C, V, dtype, 0.15, True, dict(shift=1, softcap=None, label_smoothing=0.1, z_loss=1e-4),
           strategy="eager", repeats=3)
    assert mce.LAST_TILES["eager"].startswith("stored"), mce.LAST_TILES


def test_gpu_two_pass_dh_accumulation_paths(monkeypatch):
    """Two-pass d hidden accumulates per vocabulary chunk into fp32: through the in-place
    ``addmm(out_dtype=)`` GEMM where the probe accepts it, else through mm + add; both agree
    with the reference (several chunks: MAX_CHUNK_ELEMS shrunk)."""
    from llm2vec_fast.kernels.triton import masked_ce as mce

    monkeypatch.setattr(mce, "MAX_CHUNK_ELEMS", 1 << 16)
    kw = dict(shift=1, softcap=None, label_smoothing=0.0, z_loss=0.0)
    _check(2, 300, 256, 9000, torch.bfloat16, 0.3, False, kw, strategy="two_pass")
    monkeypatch.setattr(mce, "_addmm_into_fp32_ok", lambda a: False)
    _check(2, 300, 256, 9000, torch.bfloat16, 0.3, False, kw, strategy="two_pass")


def test_gpu_eager_large_vocab_row_kernel():
    """From ROWS_WIDE_V up the eager row kernel runs 16 warps over 8192-column blocks."""
    from llm2vec_fast.kernels.triton import masked_ce as mce

    assert mce._rows_block(mce.ROWS_WIDE_V + 1, True) == (8192, 16)
    _check(2, 256, 256, mce.ROWS_WIDE_V + 4465, torch.bfloat16, 0.2, True,
           dict(shift=1, softcap=None, label_smoothing=0.1, z_loss=1e-4), strategy="eager", repeats=3)


@pytest.mark.parametrize("strategy,in_grad", [
    ("two_pass", False), ("two_pass", True), ("eager", False), ("eager", True), ("eager", "stored"),
], ids=["two_pass-own-buffers", "two_pass-in-gradient", "eager-own-buffers", "eager-in-gradient", "eager-stored"])
def test_gpu_no_host_sync_after_the_gather(strategy, in_grad):
    """Forward and backward of the per-row function never synchronise with the host, with
    buffers of their own, working inside hidden's gradient (IN_GRAD) and, for eager, with
    every dz stored (EAGER_STORED)."""
    from llm2vec_fast.kernels.triton import masked_ce as mce
    from llm2vec_fast.kernels.triton.masked_ce import MaskedLinearCEFunction

    B, T, C, V, frac = {False: (2, 512, 512, 8000, 0.5), True: (8, 1024, 512, 4000, 0.1),
                        "stored": (4, 1024, 1024, 60000, 0.1)}[in_grad]
    h, w, b, y = _inputs(B, T, C, V, torch.bfloat16, frac, True)
    flat_h, h_index, y_sel, _, _ = labelled_rows(h, y, 1, -100)
    n = h_index.shape[0]
    stored = mce.eager_stored_plan(n, V, C, B * T, 2, True, mce._mm_out_fp32_ok(h))
    assert (stored is not None) == (in_grad == "stored"), stored
    if strategy == "eager" and in_grad != "stored":
        assert mce.eager_plan(n, V, B * T, 2 * C, True, mce._mm_out_fp32_ok(h))[1] == in_grad
    elif strategy == "two_pass":
        assert bool(mce.two_pass_plan(n, V, B * T, C, 2, True)) == in_grad
    flat_h, y_sel = flat_h.detach().requires_grad_(), y_sel.int()
    params = [flat_h, w.requires_grad_(), b.requires_grad_()]

    def step():
        loss, correct = MaskedLinearCEFunction.apply(flat_h, h_index, *params[1:], y_sel, 20.0, 0.1, 1e-4, "mean", strategy)
        grads = torch.autograd.grad(loss, params)
        return loss, correct, grads

    step()  # autotuning benchmarks (and syncs) on the first call only
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(out[0]).all()


@pytest.mark.parametrize("w_grad", [True, False], ids=["d-weight", "frozen"])
def test_gpu_public_op_with_count_never_syncs(w_grad):
    """``masked_linear_cross_entropy(..., num_labelled=n)``, forward and backward, with no host
    sync at all (the labelled rows found by ``nonzero_static``, count and range checked by
    device-side assertions), and the same loss and gradients as the call that syncs."""
    import llm2vec_fast as L

    h, w, b, y = _inputs(4, 512, 1024, 32000, torch.bfloat16, 0.2, False)
    h.requires_grad_()
    w.requires_grad_(w_grad)
    params = [h, w] if w_grad else [h]
    n = int((y[:, 1:] != -100).sum())

    def step(**kw):
        loss, acc = L.masked_linear_cross_entropy(h, w, y, backend="triton", return_accuracy=True, **kw)
        return (loss, acc, *torch.autograd.grad(loss, params))

    want = step()
    step(num_labelled=n)  # autotuning and compiles (they sync) on the first call only
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step(num_labelled=n)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for a, c in zip(got, want):
        assert torch.equal(a, c)

def test_gpu_peak_memory_is_outputs_plus_small_buffers():
    """16k tokens, C = 4096, V = 128256, 20% labelled, bf16: no [N, V] buffer anywhere.

    Peak extra memory during forward + backward must stay within the gradients themselves
    (d hidden for all tokens, d weight) plus 320 MiB of work buffers (the gathered rows, a
    32 MiB d-logits chunk, an fp32 d-hidden accumulator); bf16 logits of the labelled rows
    alone would be ~800 MiB. With cut-cross-entropy importable, ours must not exceed its peak.
    """
    import llm2vec_fast as L

    B, T, C, V = 32, 512, 4096, 128256
    h, w, _, y = _inputs(B, T, C, V, torch.bfloat16, 0.2, False)
    h.requires_grad_()
    w.requires_grad_()

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = torch.autograd.grad(fn(), [h, w])
        torch.cuda.synchronize()
        del grads
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    ours_fn = lambda: L.masked_linear_cross_entropy(h, w, y, backend="triton")  # noqa: E731
    # forward and backward once outside the measurement: the first backward autotunes its
    # kernels, and the autotuner's timing buffers would count in the peak
    torch.autograd.grad(ours_fn(), [h, w])
    ours = peak(ours_fn)
    outputs = (h.numel() + w.numel()) * 2 / 2**20
    assert ours <= outputs + 320, f"peak extra {ours:.0f} MiB > outputs {outputs:.0f} MiB + 320"
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:
        return
    flat = lambda: linear_cross_entropy(h[:, :-1].reshape(-1, C), w, y[:, 1:].reshape(-1))  # noqa: E731
    torch.autograd.grad(flat(), [h, w])
    theirs = peak(flat)
    assert ours <= theirs * 1.02 + 16, f"ours {ours:.0f} MiB > cut-cross-entropy {theirs:.0f} MiB"


def test_gpu_frozen_head_peak_is_the_gradient():
    """The LoRA MNTP case (frozen LM head) at the acceptance shape (16k tokens, C = 4096,
    V = 32000, 20% labelled, bf16): ``auto`` runs eager with its chunks inside hidden's
    gradient, so the peak extra memory of forward + backward is that gradient plus vectors of
    the labelled rows (the rows move into place without a copy). With cut-cross-entropy
    importable, called with its own ``shift`` (no copy of hidden), ours must not exceed its
    peak (the target)."""
    import llm2vec_fast as L
    from llm2vec_fast.kernels.triton import masked_ce as mce

    B, T, C, V = 32, 512, 4096, 32000
    h, w, _, y = _inputs(B, T, C, V, torch.bfloat16, 0.2, False)
    h.requires_grad_()
    n = int((y[:, 1:] != -100).sum())
    rows, in_grad = mce.eager_plan(n, V, B * T, C * 2, True, mce._mm_out_fp32_ok(h))
    assert in_grad, "this torch's cuBLAS has no fp32-output GEMM into a given tensor"

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        (grad,) = torch.autograd.grad(fn(), [h])
        torch.cuda.synchronize()
        del grad
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    ours_fn = lambda: L.masked_linear_cross_entropy(h, w, y, backend="triton")  # noqa: E731
    torch.autograd.grad(ours_fn(), [h])  # compiles and autotunes outside the measurement
    ours = peak(ours_fn)
    grad_mib = h.numel() * 2 / 2**20
    slack = 1.0
    assert ours <= grad_mib + slack, f"peak extra {ours:.1f} MiB > d hidden {grad_mib:.0f} MiB + {slack:.0f}"
    # the same loss and gradient as with buffers of its own (bf16, other chunk rows)
    got = [ours_fn()]
    got += list(torch.autograd.grad(got[0], [h]))
    mce.IN_GRAD = False
    try:
        want = [ours_fn()]
        want += list(torch.autograd.grad(want[0], [h]))
    finally:
        mce.IN_GRAD = True
    for name, a, b in zip(("loss", "d hidden"), got, want):
        err = float((a.float() - b.float()).abs().max())
        scale = float(b.float().abs().max())
        assert scale > 0 and err <= 2e-2 * scale, f"{name}: max error {err:.3g} against max {scale:.3g}"
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:
        return
    theirs_fn = lambda: linear_cross_entropy(h, w, y, shift=1)  # noqa: E731
    torch.autograd.grad(theirs_fn(), [h])
    theirs = peak(theirs_fn)
    assert ours <= theirs + 1 / 64, f"ours {ours:.2f} MiB > cut-cross-entropy (shift=1) {theirs:.2f} MiB"


def test_gpu_auto_strategy(monkeypatch):
    """``auto`` on the GPU: eager for a frozen head and for few large row chunks with d weight,
    two-pass for many small chunks with d weight; each agrees with the other strategy."""
    from llm2vec_fast.kernels.triton import masked_ce as mce

    calls = {"eager": 0}
    real = mce.masked_ce_eager

    def spy(*a, **k):
        calls["eager"] += 1
        return real(*a, **k)

    monkeypatch.setattr(mce, "masked_ce_eager", spy)
    h, w, _, y = _inputs(4, 257, 256, 5003, torch.bfloat16, 0.2, False)

    def grads(strategy, w_grad):
        ts = [h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(w_grad)]
        loss = mce.masked_linear_cross_entropy_triton(ts[0], ts[1], y, strategy=strategy)
        return [loss] + list(torch.autograd.grad(loss, [t for t in ts if t.requires_grad]))

    for w_grad, chunk_elems, want_eager in ((False, None, True), (True, None, True), (True, 100 * 5003, False)):
        if chunk_elems:
            monkeypatch.setattr(mce, "EAGER_CHUNK_ELEMS", chunk_elems)  # 64-row chunks: below EAGER_MIN_W_ROWS
        calls["eager"] = 0
        auto = grads("auto", w_grad)
        assert (calls["eager"] > 0) == want_eager, (w_grad, chunk_elems, calls)
        other = grads("two_pass" if want_eager else "eager", w_grad)
        for a, b in zip(auto, other):  # relative to each tensor's scale (mean-reduced gradients are small)
            err, scale = float((a.float() - b.float()).abs().max()), float(b.float().abs().max())
            assert scale > 0 and err <= 2e-2 * scale, (w_grad, chunk_elems, err, scale)

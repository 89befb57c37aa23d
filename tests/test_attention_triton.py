"""Triton non-causal attention against the reference: interpreter on CI (fp32, fp16), GPU when present.

Every case checks the output, the log-sum-exp and dQ, dK, dV against an fp64 oracle (the
reference on fp64 inputs) with STYLE.md's rule: the budget is the error of the reference
run in the input dtype (``upcast=False``), 2x for outputs and 3x for gradients, plus a
small atol. Every buffer the launchers allocate is filled with NaN first
(``_POISON_OUTPUTS``), so an element a kernel fails to write cannot pass. Interpreter
tiles are 32 x 32 (16 x 16 at head dim 256): lengths 1, 17, 97, 130 cross several blocks
and a tail.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_close_rule, max_err

tk = pytest.importorskip("llm2vec_fast.kernels.triton.attention")

from llm2vec_fast.kernels import reference as ref  # noqa: E402
from llm2vec_fast.ops.attention import flash_attn_noncausal, flash_attn_varlen_noncausal  # noqa: E402

pytestmark = pytest.mark.interpreter

ATOL = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(tk, "_POISON_OUTPUTS", True)
    # On a GPU: the heuristic's configs, not the autotuner (which would compile and time
    # every config for each of these small cases); test_attention_gpu.py covers autotuning.
    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "0")


def _cu(lens, device):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0).to(torch.int32)
    return cu.to(device)


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _check(fast_fn, ref_fn, q, k, v, dtype, name=""):
    """Run fast and reference (fp64 oracle, native dtype) forward + backward; apply the rule."""
    atol = ATOL[dtype]
    qf, kf, vf = (_leaf(t.to(dtype)) for t in (q, k, v))
    out, lse = fast_fn(qf, kf, vf)
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    assert not torch.isnan(lse).any(), f"{name}: NaN in lse"
    do = torch.randn_like(out)
    out.backward(do)

    q64, k64, v64 = (_leaf(t.to(dtype).double()) for t in (q, k, v))
    o_or, l_or = ref_fn(q64, k64, v64, True)
    o_or.backward(do.double())

    qn, kn, vn = (_leaf(t.to(dtype)) for t in (q, k, v))
    o_nat, l_nat = ref_fn(qn, kn, vn, False)
    o_nat.backward(do)

    assert_close_rule(out, o_or, o_nat, atol=atol, name=f"{name} out")
    assert_close_rule(lse, l_or, l_nat, atol=atol, name=f"{name} lse")
    for n, a, b, c in (("dq", qf, q64, qn), ("dk", kf, k64, kn), ("dv", vf, v64, vn)):
        assert not torch.isnan(a.grad).any(), f"{name}: NaN in {n}"
        assert_close_rule(a.grad, b.grad, c.grad, factor=3.0, atol=atol, name=f"{name} {n}")
    return out, lse, (qf.grad, kf.grad, vf.grad)


def _varlen_case(lens, H, Hkv, D, dtype, device, softcap=0.0, max_seqlen=None):
    cu = _cu(lens, device)
    T = sum(lens)
    q = torch.randn(T, H, D, device=device)
    k = torch.randn(T, Hkv, D, device=device)
    v = torch.randn(T, Hkv, D, device=device)
    mx = max(lens) if max_seqlen is None else max_seqlen
    scale = 1.0 / math.sqrt(D)

    def fast(q_, k_, v_):
        return flash_attn_varlen_noncausal(q_, k_, v_, cu, cu, mx, mx, scale, softcap, backend="triton", return_lse=True)

    def reference(q_, k_, v_, upcast):
        return ref.attention_varlen_ref(q_, k_, v_, cu, cu, scale, softcap, upcast=upcast, return_lse=True)

    return _check(fast, reference, q, k, v, dtype, name=f"varlen lens={lens} H={H}/{Hkv} D={D} {dtype}")


def _padded_case(mask, B, S, H, Hkv, D, dtype, device, softcap=0.0, q=None, k=None, v=None):
    q = torch.randn(B, S, H, D, device=device) if q is None else q
    k = torch.randn(B, S, Hkv, D, device=device) if k is None else k
    v = torch.randn(B, S, Hkv, D, device=device) if v is None else v
    scale = 1.0 / math.sqrt(D)

    def fast(q_, k_, v_):
        return flash_attn_noncausal(q_, k_, v_, mask, scale, softcap, backend="triton", return_lse=True)

    def reference(q_, k_, v_, upcast):
        return ref.attention_padded_ref(q_, k_, v_, mask, scale, softcap, upcast=upcast, return_lse=True)

    return _check(fast, reference, q, k, v, dtype, name=f"padded B={B} S={S} H={H}/{Hkv} D={D} {dtype}")


# Every head dim, both dtypes, the GQA ratios 1 / 4 / 8 spread over them (not the full
# cross product: the interpreter is slow).
HEAD_CASES = [
    (32, torch.float32, 1), (32, torch.float16, 8),
    (64, torch.float32, 4), (64, torch.float16, 1),
    (80, torch.float32, 8), (80, torch.float16, 4),
    (96, torch.float32, 1), (96, torch.float16, 4),
    (128, torch.float32, 4), (128, torch.float16, 8),
    (256, torch.float32, 1), (256, torch.float16, 4),
]


@pytest.mark.parametrize("D,dtype,ratio", HEAD_CASES, ids=[f"d{d}-{str(t)[6:]}-g{r}" for d, t, r in HEAD_CASES])
def test_varlen_head_dims(D, dtype, ratio, device):
    Hkv = 1 if ratio > 1 else 2
    lens = [1, 17, 97, 130] if D < 256 else [1, 17, 40]
    _varlen_case(lens, Hkv * ratio, Hkv, D, dtype, device)


def _mask(mode, B, S, device):
    if mode == "none":
        return None
    if mode == "full":  # every token valid, given as a mask
        return torch.ones(B, S, dtype=torch.bool, device=device)
    if mode == "random":  # arbitrary holes, one row with no valid token at all
        m = torch.rand(B, S, device=device) > 0.4
        m[1] = False
        return m
    if mode == "third":  # right padding: the last third of each row
        m = torch.ones(B, S, dtype=torch.bool, device=device)
        m[:, S - S // 3:] = False
        return m
    if mode == "left":  # left padding of different lengths, one row of length 1
        lens = torch.tensor([S, 1, S // 2][:B], device=device)
        return torch.arange(S, device=device)[None, :] >= (S - lens)[:, None]
    raise ValueError(mode)


PAD_CASES = [
    ("none", torch.float16, 0.0), ("full", torch.float32, 0.0), ("random", torch.float16, 0.0),
    ("random", torch.float32, 30.0), ("third", torch.float16, 0.0), ("third", torch.float32, 0.0),
    ("left", torch.float16, 10.0),
]


@pytest.mark.parametrize("mode,dtype,softcap", PAD_CASES, ids=[f"{m}-{str(t)[6:]}-cap{c:g}" for m, t, c in PAD_CASES])
def test_padded_modes(mode, dtype, softcap, device):
    B, S, H, Hkv, D = 3, 97, 4, 2, 64
    mask = _mask(mode, B, S, device)
    out, lse, grads = _padded_case(mask, B, S, H, Hkv, D, dtype, device, softcap)
    if mask is not None:
        pad = ~mask
        assert (out[pad] == 0).all(), "padded query rows must be exactly 0"
        assert torch.isneginf(lse.permute(0, 2, 1)[pad]).all(), "padded query rows must have lse -inf"
        for g in grads:
            assert (g[pad] == 0).all(), "padded positions must get zero gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_softcap_and_empty_sequences(dtype, device):
    # Length-0 sequences anywhere, length 1, and max_seqlen an upper bound, not exact.
    _varlen_case([0, 1, 33, 0, 5, 0], 4, 2, 64, dtype, device, softcap=5.0, max_seqlen=40)


def test_varlen_all_empty(device):
    cu = torch.zeros(3, dtype=torch.int32, device=device)
    q = torch.randn(0, 2, 64, device=device, requires_grad=True)
    k = torch.randn(0, 2, 64, device=device, requires_grad=True)
    v = torch.randn(0, 2, 64, device=device, requires_grad=True)
    out, lse = flash_attn_varlen_noncausal(q, k, v, cu, cu, 0, 0, backend="triton", return_lse=True)
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_noncontiguous_views(device):
    # q as HF produces it: (B, H, S, D) transposed to (B, S, H, D); k, v slices of one fused
    # projection. The kernels take the strides; the result must not depend on the layout.
    B, S, H, Hkv, D = 2, 45, 4, 2, 32
    qh = torch.randn(B, H, S, D, device=device)
    kv = torch.randn(B, S, 2, Hkv, D, device=device)
    q, k, v = qh.transpose(1, 2), kv[:, :, 0], kv[:, :, 1]
    assert not q.is_contiguous() and not k.is_contiguous()
    mask = _mask("random", B, S, device)
    mask[1, :3] = True
    _padded_case(mask, B, S, H, Hkv, D, torch.float32, device, q=q, k=k, v=v)


def test_backward_is_deterministic(device):
    lens = [50, 31]
    cu = _cu(lens, device)
    q = torch.randn(81, 8, 32, device=device, dtype=torch.float16, requires_grad=True)
    k = torch.randn(81, 2, 32, device=device, dtype=torch.float16, requires_grad=True)
    v = torch.randn(81, 2, 32, device=device, dtype=torch.float16, requires_grad=True)
    do = torch.randn_like(q)
    grads = []
    for _ in range(2):
        out = flash_attn_varlen_noncausal(q, k, v, cu, cu, 50, 50, backend="triton", deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), do))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_gpu_tiles_in_interpreter(monkeypatch, device):
    # The heuristic's CUDA tiles (64 / 128 rows, the unmasked full-block path) run here too.
    def big(kind, head_dim, fp32, max_seqlen, on_cuda):
        return tk._cfg(64, 128, 4, 1) if kind == "dkdv" else tk._cfg(64, 64, 4, 1) if kind == "dq" else tk._cfg(128, 64, 4, 1)

    monkeypatch.setattr(tk, "heuristic_config", big)
    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "0")
    _varlen_case([130, 64, 1], 4, 1, 64, torch.float16, device)


def test_unsupported_falls_back_with_warning(device):
    q = torch.randn(5, 2, 48, device=device)
    cu = _cu([5], device)
    assert tk.unsupported_reason(q) is not None
    assert tk.unsupported_reason(q[..., :32].contiguous(), dropout_p=0.1) == "dropout_p > 0"
    assert tk.unsupported_reason(q.double()[..., :32]) is not None
    with pytest.warns(RuntimeWarning, match="does not support"):
        out = flash_attn_varlen_noncausal(q, q, q, cu, cu, 5, 5, backend="triton")
    assert max_err(out, ref.attention_varlen_ref(q, q, q, cu, cu)) < 1e-5


def test_fake_shapes_for_torch_compile(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        q = torch.empty(7, 4, 64)
        k = torch.empty(7, 2, 64)
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        out, lse = torch.ops.llm2vec_fast.attn_fwd(q, k, k, cu, cu, None, 4, 4, 0.125, 0.0)
        assert out.shape == (7, 4, 64) and lse.shape == (4, 7) and lse.dtype == torch.float32
        qp = torch.empty(2, 9, 4, 64)
        out, lse = torch.ops.llm2vec_fast.attn_fwd(qp, qp, qp, None, None, None, 9, 9, 0.125, 0.0)
        assert out.shape == qp.shape and lse.shape == (2, 4, 9)
        dq, dk, dv = torch.ops.llm2vec_fast.attn_bwd(qp, qp, qp, qp, qp, lse, None, None, None, 9, 9, 0.125, 0.0)
        assert dq.shape == qp.shape
    del mode


# --------------------------------------------------------------------------------------
# Property-based: random varlen layouts (bounded so CI stays fast)
# --------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    lens=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    ratio=st.sampled_from([1, 2, 4]),
    D=st.sampled_from([32, 80]),
    softcap=st.sampled_from([0.0, 3.0]),
)
def test_hypothesis_varlen_layouts(lens, ratio, D, softcap):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if sum(lens) == 0:
        lens = lens + [1]
    _varlen_case(lens, ratio, 1, D, torch.float32, device, softcap=softcap)

"""The attention ops' host-side contract: argument checks, the log-sum-exp's (absent)
gradient, no silent double backward, the custom op's fake layouts, and caches that never
serve a stale structure (inference-mode masks edited in place, position ids reused for
another batch). Small shapes, interpreted on CI."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import max_err

tk = pytest.importorskip("llm2vec_fast.kernels.triton.attention")

from llm2vec_fast.kernels import reference as ref  # noqa: E402
from llm2vec_fast.ops.attention import flash_attn_noncausal, flash_attn_varlen_noncausal  # noqa: E402

pytestmark = pytest.mark.interpreter


def _qkv(shape_q, shape_kv, device, grad=False):
    return [torch.randn(s, device=device, requires_grad=grad) for s in (shape_q, shape_kv, shape_kv)]


def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_max_seqlen_below_the_longest_sequence_is_refused(backend, device):
    """The kernels' grid is sized by max_seqlen: one below the longest left rows unwritten."""
    q, k, v = _qkv((50, 2, 32), (50, 2, 32), device)
    cu = _cu([40, 10], device)
    for m in (16, 0, 39):
        with pytest.raises(ValueError, match=r"max_seqlen_q: expected at least the longest sequence \(40"):
            flash_attn_varlen_noncausal(q, k, v, cu, cu, m, 40, backend=backend)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        flash_attn_varlen_noncausal(q, k, v, cu, cu, 40, 12, backend=backend)
    flash_attn_varlen_noncausal(q, k, v, cu, cu, 64, 64, backend=backend)  # an upper bound is fine


def test_bad_scalars_and_head_dim(device):
    q, k, v = _qkv((1, 4, 2, 16), (1, 4, 2, 16), device)
    for kw, name in ((dict(softmax_scale=math.inf), "softmax_scale"), (dict(softcap=math.inf), "softcap"),
                     (dict(softmax_scale=float("nan")), "softmax_scale")):
        with pytest.raises(ValueError, match=name):
            flash_attn_noncausal(q, k, v, **kw)
    z = torch.randn(1, 4, 2, 0, device=device)
    with pytest.raises(ValueError, match="head dim D > 0"):
        flash_attn_noncausal(z, z, z)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_lse_is_returned_without_gradient_on_every_backend(backend, layout, device):
    """As flash-attn's: the lse carries no gradient. The Triton backend marked it so while the
    torch backend let gradients through it: a loss using it trained differently per backend."""
    if layout == "padded":
        q, k, v = _qkv((2, 9, 2, 32), (2, 9, 1, 32), device, grad=True)
        mask = torch.ones(2, 9, dtype=torch.bool, device=device)
        mask[1, 6:] = False
        out, lse = flash_attn_noncausal(q, k, v, mask, backend=backend, return_lse=True)
    else:
        q, k, v = _qkv((12, 2, 32), (12, 1, 32), device, grad=True)
        cu = _cu([5, 7], device)
        out, lse = flash_attn_varlen_noncausal(q, k, v, cu, cu, 7, 7, backend=backend, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


def test_double_backward_through_triton_is_an_error(device):
    q, k, v = _qkv((1, 8, 2, 32), (1, 8, 2, 32), device, grad=True)  # D = 32: a Triton case
    out = flash_attn_noncausal(q, k, v, backend="triton")
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.square().sum().backward()


def test_custom_op_fakes_give_the_real_layouts(device):
    """torch.compile (inductor) checks the real outputs' strides against the fake ones: the
    fakes copied q's (transposed) strides while the launchers allocate contiguous buffers."""
    B, S, H, D = 2, 5, 2, 32
    qh, kh, vh = (torch.randn(B, H, S, D, device=device) for _ in range(3))
    q, k, v = (t.transpose(1, 2) for t in (qh, kh, vh))  # (B, S, H, D) views, as transformers' are
    mask = torch.ones(B, S, dtype=torch.bool, device=device)
    fwd_args = (q, k, v, None, None, mask, S, S, 0.25, 0.0)
    torch.library.opcheck(torch.ops.llm2vec_fast.attn_fwd.default, fwd_args, test_utils=("test_faketensor",))
    out, lse = torch.ops.llm2vec_fast.attn_fwd.default(*fwd_args)
    bwd_args = (torch.randn_like(out).transpose(1, 2).contiguous().transpose(1, 2), q, k, v, out, lse, None, None,
                mask, S, S, 0.25, 0.0)
    torch.library.opcheck(torch.ops.llm2vec_fast.attn_bwd.default, bwd_args, test_utils=("test_faketensor",))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_mask_edited_in_place_in_inference_mode_is_read_again(backend, device):
    """Inference tensors have no version counter: a mask edited in place under
    torch.inference_mode between two calls was served from the first call's cache."""
    B, S, H, D = 2, 20, 2, 32
    with torch.inference_mode():
        q, k, v = _qkv((B, S, H, D), (B, S, H, D), device)
        mask = torch.ones(B, S, dtype=torch.bool, device=device)
        first = flash_attn_noncausal(q, k, v, mask, backend=backend)
        mask[1, 10:] = False
        mask[0, :5] = False
        second = flash_attn_noncausal(q, k, v, mask, backend=backend)
        want = ref.attention_padded_ref(q.double(), k.double(), v.double(), mask, 1 / math.sqrt(D), 0.0, 0.0)
    assert max_err(first, second) > 1e-2  # the edit matters
    assert max_err(second, want) < 1e-5


def test_position_ids_reused_for_another_batch_size():
    """packed_from_position_ids cached on the tensor alone: the same (1, S) ids expanded to
    another batch size got the first batch's offsets."""
    from llm2vec_fast.hf.padding import packed_from_position_ids

    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    cu1, _ = packed_from_position_ids(pos, 1)
    cu2, _ = packed_from_position_ids(pos, 2)
    assert cu1.tolist() == [0, 3, 6] and cu2.tolist() == [0, 3, 6, 9, 12]
    assert packed_from_position_ids(pos, 1)[0] is cu1  # still cached per batch size


def test_varlen_compiles_with_fullgraph(device):
    """Under torch.compile the offsets' value checks (a host read, a data-dependent guard)
    are skipped: fullgraph=True compiles (it failed on the guard) and gives the eager result."""
    cu = _cu([7, 12], device)
    q, k, v = _qkv((19, 2, 32), (19, 2, 32), device, grad=True)

    def f(q, k, v):
        return flash_attn_varlen_noncausal(q, k, v, cu, cu, 12, 12, backend="triton").square().sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    (g_c,) = torch.autograd.grad(got, q)
    want = f(q, k, v)
    (g_e,) = torch.autograd.grad(want, q)
    assert max_err(got, want) <= 1e-5 * float(want.abs()) and max_err(g_c, g_e) <= 1e-5


@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_compiled_calls_do_not_recompile(layout, device):
    """Every direct call starts a cache generation; traced, the counter's value became a
    guard, so each call recompiled and the 9th failed under fullgraph=True (recompile limit)."""
    from torch._dynamo.utils import counters

    if layout == "padded":
        q, k, v = _qkv((2, 9, 2, 32), (2, 9, 1, 32), device)
        mask = torch.ones(2, 9, dtype=torch.bool, device=device)
        mask[1, 6:] = False
        f = lambda q, k, v: flash_attn_noncausal(q, k, v, mask, backend="triton")  # noqa: E731
    else:
        q, k, v = _qkv((12, 2, 32), (12, 1, 32), device)
        cu = _cu([5, 7], device)
        f = lambda q, k, v: flash_attn_varlen_noncausal(q, k, v, cu, cu, 7, 7, backend="triton")  # noqa: E731
    torch._dynamo.reset()
    counters.clear()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    want = f(q, k, v)
    for _ in range(10):
        assert max_err(cf(q, k, v), want) <= 1e-6
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]


def test_compiled_call_reads_an_inference_mask_edited_in_place(device):
    """Inside a compiled graph the generation starts at run time (the custom op's ``fresh``):
    the mask edited in place between two compiled calls is read again."""
    B, S, H, D = 2, 20, 2, 32
    torch._dynamo.reset()
    cf = torch.compile(lambda q, k, v, m: flash_attn_noncausal(q, k, v, m, backend="triton"), fullgraph=True,
                       backend="aot_eager")
    with torch.inference_mode():
        q, k, v = _qkv((B, S, H, D), (B, S, H, D), device)
        mask = torch.ones(B, S, dtype=torch.bool, device=device)
        first = cf(q, k, v, mask)
        mask[1, 10:] = False
        mask[0, :5] = False
        second = cf(q, k, v, mask)
        want = ref.attention_padded_ref(q.double(), k.double(), v.double(), mask, 1 / math.sqrt(D), 0.0, 0.0)
    assert max_err(first, second) > 1e-2  # the edit matters
    assert max_err(second, want) < 1e-5

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


EVEN_CASES = [  # (D, dtype, softcap, tiles, backward): the dK/dV kernels' one-loop path at every BLOCK_D but 64
    (32, torch.float16, 0.0, "interp", "separate"), (64, torch.float32, 0.0, "interp", "separate"),
    (80, torch.float16, 5.0, "interp", "separate"), (128, torch.float16, 0.0, "interp", "separate"),
    (256, torch.float16, 0.0, "interp", "separate"), (128, torch.float16, 10.0, "gpu", "separate"),
    (80, torch.float16, 0.0, "gpu", "separate"), (128, torch.float16, 0.0, "gpu", "atomic"),
    (64, torch.float16, 0.0, "interp", "atomic"),
]


@pytest.mark.parametrize("D,dtype,softcap,tiles,bwd", EVEN_CASES,
                         ids=[f"d{d}-{str(t)[6:]}-cap{c:g}-{ti}-{b}" for d, t, c, ti, b in EVEN_CASES])
def test_dense_even_rows(device, monkeypatch, D, dtype, softcap, tiles, bwd):
    """Dense layout, S a multiple of EVEN_M_ROWS, 16-bit: the dK/dV kernel runs with EVEN_M
    (query blocks without row masks) and keeps the rule; S one row off, or fp32, takes the
    masked loop."""
    if tiles == "gpu":  # the GPU's 64-row tiles (the heuristic's first dK/dV entry at D = 128)
        monkeypatch.setattr(tk, "heuristic_config", lambda kind, *a, **kw: tk._cfg(64, 64, 4, 1) if kind.startswith("dkdv")
                            else tk._cfg(64, 64, 4, 1) if kind == "dq" else tk._cfg(128, 64, 4, 1))
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_BWD", bwd)
    launched = []
    real = tk._launch
    monkeypatch.setattr(tk, "_launch", lambda kind, *a, **kw: launched.append((kind, a[3].get("EVEN_M"))) or real(kind, *a, **kw))
    B, H, Hkv = 2, 4, 2
    S = tk.EVEN_M_ROWS * (1 if D == 256 else 2)
    _padded_case(None, B, S, H, Hkv, D, dtype, device, softcap)
    assert [e for k, e in launched if k.startswith("dkdv")] == [dtype != torch.float32], launched
    launched.clear()
    _padded_case(None, B, S - 1, H, Hkv, D, dtype, device, softcap)
    assert [e for k, e in launched if k.startswith("dkdv")] == [False], launched


@pytest.mark.parametrize("layout,D", [("varlen", 128), ("left", 80), ("random", 128), ("third", 128), ("none", 128)])
def test_split_tile_option(device, monkeypatch, layout, D):
    """The dK/dV tile option SPLIT_M (full query blocks unmasked, a masked first block where
    the span starts inside one, a masked tail) keeps the rule in the packed and padded
    layouts (left padding starts mid-block; holes; a row without valid tokens; dense with a
    ragged S), and its name reaches the benchmark rows."""
    split = tk._cfg(64, 128, 8, 1, split=True)
    monkeypatch.setattr(tk, "heuristic_config", lambda kind, *a, **kw: split if kind == "dkdv"
                        else tk._cfg(64, 64, 4, 1) if kind == "dq" else tk._cfg(128, 64, 4, 1))
    tk.LAST_TILES.clear()
    if layout == "varlen":
        _varlen_case([130, 64, 1, 0, 200], 4, 2, D, torch.float16, device)
    else:
        B, S = 3, 200
        mask = _mask(layout, B, S, device)
        if mask is not None and layout != "random":
            mask[2] = False
        out, _, grads = _padded_case(mask, B, S, 4, 2, D, torch.float16, device)
        if mask is not None:
            assert (out[~mask] == 0).all() and all((g[~mask] == 0).all() for g in grads)
    assert tk.LAST_TILES["dkdv"] == "64x128 w8 s1 split", tk.LAST_TILES


def test_even_m_rows_divisible_by_every_dkdv_tile():
    """EVEN_M is decided before the autotuner picks a tile: every BLOCK_M the dK/dV kernels
    may launch with (every list, chip, dtype, dropout, the atomic lists, the interpreter's
    tiles) must divide EVEN_M_ROWS."""
    lists = [tk.BWD_DKDV_CONFIGS, tk.BWD_DKDV_ATOMIC_CONFIGS, tk.DROPOUT_DKDV_CONFIGS, tk.FP32_CONFIGS["dkdv"]]
    cfgs = [c for table in lists for entries in table.values() for c in entries]
    cfgs += [c for (kind, _, _), entries in tk.SM80_CONFIGS.items() if kind.startswith("dkdv") for c in entries]
    for hd in tk.SUPPORTED_HEAD_DIMS:
        for fp32 in (False, True):
            for dropout in (False, True):
                for chip in tk.CHIPS:
                    cfgs += [tk.heuristic_config("dkdv", hd, fp32, s, cuda, dropout, chip)
                             for s in (64, 4096) for cuda in (True, False)]
    assert len(cfgs) > 30
    for c in cfgs:
        assert tk.EVEN_M_ROWS % c.kwargs["BLOCK_M"] == 0, c


def test_mask_spans_built_once_per_mask(device, monkeypatch):
    """The per-row [lo, hi, holes] of a padding mask are built once for the mask object (every
    layer's forward and backward reuse them) and rebuilt for a new mask or an in-place change."""
    builds = []
    real = tk._build_mask_range
    monkeypatch.setattr(tk, "_build_mask_range", lambda m: builds.append(1) or real(m))
    monkeypatch.setattr(tk, "_RANGE_SLOT", [None])
    B, S, H, D = 2, 40, 2, 32
    mask = torch.ones(B, S, dtype=torch.bool, device=device)
    mask[0, 30:] = False
    q, k, v = (torch.randn(B, S, H, D, device=device, requires_grad=True) for _ in range(3))

    def layer(m):
        return flash_attn_noncausal(q, k, v, key_padding_mask=m, backend="triton")

    out = layer(mask)
    out = layer(mask) + out  # a second layer, same mask object
    out.sum().backward()
    assert len(builds) == 1
    mask[1, :5] = False  # in place: the spans change
    want = ref.attention_padded_ref(q.detach(), k.detach(), v.detach(), mask, 1 / math.sqrt(D))
    assert max_err(layer(mask).detach(), want) < 1e-4 and len(builds) == 2
    layer(mask.clone())
    assert len(builds) == 3


@pytest.mark.parametrize("mode", ["left", "third"])
def test_hole_free_mask_forward(device, monkeypatch, mode):
    """A mask noted hole-free (hf PaddingInfo does it for left / right padding) runs the forward
    and the dQ kernel compiled without their loop copy for holes (MASK_HOLES off): same output,
    lse and gradients to the bit as the general copies, which a mask with holes always takes."""
    from llm2vec_fast import _tensor_cache as tc

    launched = []
    real = tk._launch
    monkeypatch.setattr(tk, "_launch", lambda kind, *a, **kw: launched.append((kind, a[3].get("MASK_HOLES"))) or real(kind, *a, **kw))
    monkeypatch.setattr(tc, "_HOLE_FREE", [None])
    B, S, H, Hkv, D = 3, 71, 4, 2, 64
    mask = _mask(mode, B, S, device)
    q = torch.randn(B, S, H, D, device=device, dtype=torch.float16)
    k, v = (torch.randn(B, S, Hkv, D, device=device, dtype=torch.float16) for _ in range(2))
    do = torch.randn(B, S, H, D, device=device, dtype=torch.float16)

    def run(m):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = flash_attn_noncausal(*qkv, key_padding_mask=m, backend="triton", return_lse=True)
        return [out.detach(), lse.detach()] + list(torch.autograd.grad(out, qkv, do))

    general = run(mask)
    tc.note_hole_free(mask)
    spans = run(mask)
    assert [(k, h) for k, h in launched if k in ("fwd", "dq")] == [("fwd", True), ("dq", True), ("fwd", False), ("dq", False)]
    for a, b in zip(general, spans):
        assert torch.equal(a, b)
    want = ref.attention_padded_ref(q.float(), k.float(), v.float(), mask, 1 / math.sqrt(D))
    assert max_err(spans[0].float(), want) < 4e-3  # fp16 output rounding; the equality above is the test
    holes = _mask("random", B, S, device)
    run(holes)
    assert [(k, h) for k, h in launched[-3:] if k in ("fwd", "dq")] == [("fwd", True), ("dq", True)]


@pytest.fixture
def force_tma(monkeypatch):
    """TMA tiles under the interpreter (which runs descriptor loads on the CPU): the heuristic's
    interpreter tile with its TMA option, wherever :func:`_tma_ok`'s other rules allow."""
    monkeypatch.setattr(tk, "_FORCE_TMA", True)


TMA_CASES = [(64, 1), (80, 4), (128, 8)]


@pytest.mark.parametrize("D,ratio", TMA_CASES, ids=[f"d{d}-g{r}" for d, r in TMA_CASES])
def test_tma_tiles_varlen(D, ratio, device, force_tma):
    """Packed sequences through the TMA tiles. The forward's host descriptors: each tail
    block's rows run into the next sequence (the last one's past the tensor's end, zeros).
    The dK/dV kernel's descriptors, bounded to each sequence: its unmasked loop reads lse2 and
    delta past the span (the next sequence's rows, the buffers' tail). D = 80 pads the head
    dim from the descriptors' bounds; output, lse and the three gradients against the oracle
    as every other case."""
    tk.LAST_TILES.clear()
    _varlen_case([1, 17, 97, 130], 2 * ratio, 2, D, torch.float16, device)
    assert tk.LAST_TILES["fwd"] == tk.LAST_TILES["dq"] == tk.LAST_TILES["dkdv"] == "32x32 w4 s1 tma"


@pytest.mark.parametrize("mode", ["none", "third", "left", "random"])
def test_tma_tiles_padded(mode, device, force_tma, monkeypatch):
    """The padded layout through the TMA tiles where the mask is noted hole-free (left / right
    padding, as hf PaddingInfo notes it) or absent; a mask with holes keeps the pointer tiles
    (TMA tiles have no loop copy for holes)."""
    from llm2vec_fast import _tensor_cache as tc

    monkeypatch.setattr(tc, "_HOLE_FREE", [None])
    B, S, H, Hkv, D = 3, 75, 4, 2, 64
    mask = _mask(mode, B, S, device)
    if mode in ("third", "left"):
        tc.note_hole_free(mask)
    tk.LAST_TILES.clear()
    out, lse, grads = _padded_case(mask, B, S, H, Hkv, D, torch.float16, device)
    assert tk.LAST_TILES["fwd"] == tk.LAST_TILES["dq"] == ("32x32 w4 s1" if mode == "random" else "32x32 w4 s1 tma")
    assert tk.LAST_TILES["dkdv"] == "32x32 w4 s1 tma"  # dK/dV's TMA tiles take masks with holes too
    if mask is not None:
        assert (out[~mask] == 0).all() and torch.isneginf(lse.permute(0, 2, 1)[~mask]).all()


def test_tma_tiles_very_negative_logits(device, force_tma):
    """A sequence whose every score is below -128 / log2(e) (its lse2 < -128) after one with
    ordinary scores, packed: the dK/dV tiles' query blocks past the first sequence read the
    second's lse2 against zero q rows, and the dQ tiles' tail keys past the second's span are
    zero K rows; exp2(-lse2) overflows there, so without their masks the zero rows would
    turn inf into NaN. Gradients must stay finite and match the oracle."""
    lens, H, D = [37, 45], 2, 64
    cu = _cu(lens, device)
    g = torch.Generator(device="cpu").manual_seed(3)
    q = torch.randn(82, H, D, generator=g)
    k = torch.randn(82, H, D, generator=g)
    q[37:] = -8.0 + 0.1 * q[37:]  # scores ~ -8 * 8 * 64 / 8 = -512 for the second sequence
    k[37:] = 8.0 + 0.1 * k[37:]
    v = torch.randn(82, H, D, generator=g)
    scale = 1.0 / math.sqrt(D)

    def fast(q_, k_, v_):
        return flash_attn_varlen_noncausal(q_, k_, v_, cu, cu, 45, 45, scale, backend="triton", return_lse=True)

    def reference(q_, k_, v_, upcast):
        return ref.attention_varlen_ref(q_, k_, v_, cu, cu, scale, upcast=upcast, return_lse=True)

    tk.LAST_TILES.clear()
    out, lse, _ = _check(fast, reference, q.to(device), k.to(device), v.to(device), torch.float16, name="very negative")
    assert lse[:, 37:].max() < -300  # the case: lse2 well below -128
    assert tk.LAST_TILES["dq"] == tk.LAST_TILES["dkdv"] == "32x32 w4 s1 tma"


@pytest.mark.parametrize("mode", ["left", "third"])
def test_tma_padding_contents_never_reach_valid_tokens(mode, device, force_tma, monkeypatch):
    """NaN at padded positions of q, k, v (against zeros) through the TMA forward: its tiles
    read padding rows whole (a tail block's keys past the span, queries below / past it), so
    the scores' key mask and V's zeroed tail rows must keep them out: valid outputs equal to
    the bit, padded rows exactly 0, and the backward's gradients unchanged."""
    from llm2vec_fast import _tensor_cache as tc

    monkeypatch.setattr(tc, "_HOLE_FREE", [None])
    B, S, H, D = 3, 90, 2, 64
    mask = _mask(mode, B, S, device)
    tk.LAST_TILES.clear()
    _assert_padding_never_leaks(mask, *_poisoned_padding_runs(mask, (B, S, H, D), device, noted=True))
    assert set(tk.LAST_TILES.values()) == {"32x32 w4 s1 tma"}


def test_tma_rules(device, monkeypatch):
    """Which launches take TMA tiles (:func:`_tma_ok`): 16-bit, no dropout, no mask with holes,
    tensors a tensor map can describe, LLM2VEC_FAST_ATTN_TMA not 0, and a GPU of the sm_90
    family (or the tests' interpreter switch). A bad value of the variable is refused by name."""
    q = torch.randn(10, 4, 64, device=device, dtype=torch.float16)
    k = v = torch.randn(10, 2, 64, device=device, dtype=torch.float16)
    assert not tk._tma_ok((q, k, v), False, False, False)  # no sm_90 GPU here

    class OnHopper:  # what _tma_ok reads of a CUDA tensor on an sm_90 GPU
        is_cuda, device = True, torch.device("cuda", 0)

        def __init__(self, t):
            self.t = t

        def data_ptr(self):
            return 0

        def stride(self, *dim):
            return self.t.stride(*dim)

        def element_size(self):
            return self.t.element_size()

    monkeypatch.setattr(tk, "chip_of", lambda device: 90)
    cuda = [OnHopper(t) for t in (q, k, v)]
    assert tk._tma_ok(cuda, False, False, False, max_seqlen=tk.TMA_MIN_SEQLEN)
    assert not tk._tma_ok(cuda, False, False, False, max_seqlen=tk.TMA_MIN_SEQLEN - 1)  # short: host-bound
    monkeypatch.setattr(tk, "chip_of", lambda device: 80)
    assert not tk._tma_ok(cuda, False, False, False, max_seqlen=4096)
    monkeypatch.setattr(tk, "_FORCE_TMA", True)
    assert tk._tma_ok((q, k, v), False, False, False)
    assert not tk._tma_ok((q.float(), k.float(), v.float()), True, False, False)
    assert not tk._tma_ok((q, k, v), False, True, False)  # dropout
    assert not tk._tma_ok((q, k, v), False, False, True)  # a mask that may have holes
    odd = torch.randn(10 * 4 * 64 + 1, device=device, dtype=torch.float16)[1:].view(10, 4, 64)
    assert not tk._tma_ok((odd, k, v), False, False, False)  # base not 16-byte aligned
    narrow = torch.randn(10, 4, 68, device=device, dtype=torch.float16)[..., :64]
    assert not tk._tma_ok((narrow, k, v), False, False, False)  # a head stride of 136 bytes
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_TMA", "0")
    assert not tk._tma_ok((q, k, v), False, False, False)
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_TMA", "yes")
    with pytest.raises(ValueError, match="LLM2VEC_FAST_ATTN_TMA"):
        tk._tma_ok((q, k, v), False, False, False)
    # the lists: TMA tiles only for 16-bit sm_90 launches that pass descriptors
    tma_tiles = [c for c in tk.fwd_configs(128) if c.kwargs.get("TMA")]
    assert tma_tiles and [c for c in tk.bwd_dkdv_configs(128) if c.kwargs.get("TMA")]
    # the autotuner's forward TMA tiles set their descriptors' block shapes; nothing else has a hook
    hooks = {c.kwargs.get("TMA", False): c.pre_hook for c in tk._tuned("fwd", 128, False, False, 90, tma=True).configs}
    assert hooks == {True: tk._DESC_BLOCKS, False: None}
    assert all(c.pre_hook is None for c in tk._tuned("dkdv", 128, False, False, 90, tma=True).configs)
    assert all(c.kwargs["BLOCK_M"] <= tk.TAIL_ROWS for c in tk.bwd_dkdv_configs(128) + tk.bwd_dkdv_configs(64))
    assert not any(c.kwargs.get("TMA") for c in tk._configs("fwd", 128, False, False, 90, tma=False))
    assert not any(c.kwargs.get("TMA") for c in tk.fwd_configs(128, chip=80))
    assert not any(c.kwargs.get("TMA") for c in tk.fwd_configs(128, dropout=True) + tk.fwd_configs(128, fp32=True))
    # a list cut down to TMA tiles (the tile sweep does that) on a launch that cannot take them: a named error
    monkeypatch.setitem(tk.BWD_DQ_CONFIGS, 128, [tk._cfg(128, 64, 8, 3, tma=True)])
    assert tk.heuristic_config("dq", 128, False, 1024, True, tma=True).kwargs["TMA"]
    with pytest.raises(ValueError, match="only TMA tiles"):
        tk.heuristic_config("dq", 128, False, 1024, True)
    # descriptors: 4-D, packed as (1, T, H, D); block shapes set from a config's tiles
    qd, kd, vd = tk._tma_descs(q, k, v, varlen=True)
    assert qd.shape == [1, 10, 4, 64] and kd.shape == [1, 10, 2, 64]
    tk._DESC_BLOCKS({"QD": qd, "KD": kd, "VD": vd, **tma_tiles[0].kwargs})
    bm, bn = tma_tiles[0].kwargs["BLOCK_M"], tma_tiles[0].kwargs["BLOCK_N"]
    assert qd.block_shape == [1, bm, 1, 64] and kd.block_shape == vd.block_shape == [1, bn, 1, 64]


def test_tma_allocator_set_only_where_missing():
    """The dQ / dK/dV TMA tiles make descriptors in the kernel, which takes global scratch from
    Triton's allocator: set to torch's where the launching thread's context has none, a
    caller's own allocator kept."""
    import contextvars

    from triton.runtime import _allocation

    def mine(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    def run(preset):
        if preset is not None:
            triton.set_allocator(preset)
        tk._ensure_allocator()
        return _allocation._allocator.get()

    import triton

    assert contextvars.Context().run(run, None) is tk._torch_scratch
    assert contextvars.Context().run(run, mine) is mine


def test_power_of_two_helpers():
    """The launchers' integer next-power-of-two (head-dim block, sequence bucket) agrees with
    Triton's at every size around the boundaries."""
    import triton

    for n in list(range(1, 300)) + [1023, 1024, 1025, 4095, 4096, 4097, 65537]:
        assert tk._block_d(n) == max(16, triton.next_power_of_2(n)), n
        assert tk._seq_bucket(n) == triton.next_power_of_2(max(n, 16)), n
    assert tk._seq_bucket(0) == 16


def test_autotune_keys():
    """The tuners are keyed on the layout and, where the kernel compiles the hole-free copy
    alone (forward, dQ), on MASK_HOLES, the dK/dV kernels on EVEN_M; every key names an
    argument of its kernel (Triton refuses the tuner otherwise)."""
    for kind in ("fwd", "dq", "dkdv", "dkdv_atomic"):
        tuner = tk._tuned(kind, 128, False, False, 90)
        assert set(tuner.keys) <= set(tuner.arg_names)
        assert ("MASK_HOLES" in tuner.keys) == (kind in ("fwd", "dq")), (kind, tuner.keys)
        assert ("EVEN_M" in tuner.keys) == kind.startswith("dkdv"), (kind, tuner.keys)


def test_sequence_order_longest_first(device):
    """Where lengths vary the programs take their sequences longest first: the order is a
    stable descending argsort of the lengths (varlen: query + key lengths; padded: the mask's
    span), built once per cu_seqlens / mask object."""
    cu = _cu([3, 9, 0, 9, 4], device)
    assert tk._varlen_order(cu, cu).tolist() == [1, 3, 4, 0, 2]
    assert tk._varlen_order(cu, cu) is tk._varlen_order(cu, cu)  # cached for the object
    cu_k = _cu([5, 1, 1, 1, 1], device)
    assert tk._varlen_order(cu, cu_k).tolist() == [1, 3, 0, 4, 2]  # 8, 10, 1, 10, 5
    assert tk._varlen_order(cu, cu_k) is tk._varlen_order(cu, cu_k)  # cached for the pair
    cu_k2 = cu_k.clone()
    assert tk._varlen_order(cu, cu_k2) is not tk._varlen_order(cu, cu_k)  # another object rebuilds
    cu_k2[1:] = _cu([0, 0, 0, 0, 20], device)[1:]  # in place: 3, 9, 0, 9, 24
    assert tk._varlen_order(cu, cu_k2).tolist() == [4, 1, 3, 0, 2]
    mask = torch.zeros(4, 10, dtype=torch.bool, device=device)
    mask[0, :4] = mask[1, 2:9] = mask[3, 5:] = True
    mask[1, 5] = False  # a hole counts inside its span
    assert tk._mask_range(mask)[2].tolist() == [1, 3, 0, 2]


def test_identity_order_once_per_object(device, monkeypatch):
    """With ``LONGEST_FIRST`` off the kernels get batch order, built once per mask /
    ``cu_seqlens`` object like the longest-first order, not once per launch."""
    monkeypatch.setattr(tk, "LONGEST_FIRST", False)
    monkeypatch.setattr(tk, "_IDENTITY_SLOT", [None])
    cu = _cu([3, 9, 0, 9, 4], device)
    mask = torch.ones(3, 7, dtype=torch.bool, device=device)
    assert tk._varlen_order(cu, cu).tolist() == [0, 1, 2, 3, 4]
    assert tk._varlen_order(cu, cu) is tk._varlen_order(cu, cu)
    assert tk._mask_range(mask)[2].tolist() == [0, 1, 2]
    assert tk._mask_range(mask)[2] is tk._mask_range(mask)[2]


@pytest.mark.parametrize("layout", ["varlen", "padded"])
def test_kernels_take_sequences_from_the_order(device, monkeypatch, layout):
    """The three kernels read each program's sequence from the order: the identity order
    (``LONGEST_FIRST`` off) gives the same bits as longest first, and an order that names
    sequence 0 for every program leaves the other sequences unwritten (NaN-poisoned)."""
    lens = [7, 40, 0, 23]
    B, S, H, Hkv, D = len(lens), max(lens), 4, 2, 32
    gen = torch.Generator().manual_seed(11)
    if layout == "varlen":
        cu = _cu(lens, device)
        shapes = [(sum(lens), H, D), (sum(lens), Hkv, D), (sum(lens), Hkv, D)]
    else:
        mask = torch.zeros(B, S, dtype=torch.bool, device=device)
        for b, n in enumerate(lens):
            mask[b, :n] = True
        shapes = [(B, S, H, D), (B, S, Hkv, D), (B, S, Hkv, D)]
    qkv = [torch.randn(sh, generator=gen).to(device) for sh in shapes]
    do = torch.randn(shapes[0], generator=gen).to(device)

    def run():
        q, k, v = (t.clone().requires_grad_() for t in qkv)
        if layout == "varlen":
            out = flash_attn_varlen_noncausal(q, k, v, cu, cu, S, S, backend="triton")
        else:
            out = flash_attn_noncausal(q, k, v, key_padding_mask=mask, backend="triton")
        return [out.detach()] + list(torch.autograd.grad(out, (q, k, v), do))

    monkeypatch.setattr(tk, "_ORDER_SLOT", [None])
    monkeypatch.setattr(tk, "_RANGE_SLOT", [None])
    longest = run()
    monkeypatch.setattr(tk, "LONGEST_FIRST", False)
    for a, b in zip(longest, run()):
        assert torch.equal(a, b)
    monkeypatch.setattr(tk, "LONGEST_FIRST", True)
    monkeypatch.setattr(tk, "_ORDER_SLOT", [None])
    monkeypatch.setattr(tk, "_RANGE_SLOT", [None])
    monkeypatch.setattr(tk, "_seq_order", lambda n: torch.zeros_like(n, dtype=torch.int32))
    out = run()[0]
    if layout == "varlen":
        assert not torch.isnan(out[: lens[0]]).any() and torch.isnan(out[lens[0]:]).all()
    else:
        assert not torch.isnan(out[0]).any() and torch.isnan(out[1:]).all()


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


@pytest.mark.parametrize("D", [64, 80, 128])
def test_gpu_tiles_in_interpreter(monkeypatch, device, D):
    # The heuristic's CUDA tiles (64 / 128 rows) run here too: at D = 64 the unmasked
    # full-block paths, at BLOCK_D 128 (D = 80 with its head-dim mask, D = 128) the dK/dV
    # kernel's one key-masked loop for 64-row tiles, which forms dS before the dV matmul.
    def big(kind, head_dim, fp32, max_seqlen, on_cuda, dropout=False, chip=90, **kw):
        return tk._cfg(64, 128, 4, 1) if kind == "dkdv" else tk._cfg(64, 64, 4, 1) if kind == "dq" else tk._cfg(128, 64, 4, 1)

    monkeypatch.setattr(tk, "heuristic_config", big)
    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "0")
    tk.LAST_TILES.clear()
    _varlen_case([130, 64, 1], 4, 1, D, torch.float16, device)
    # benchmark rows name the tiles each kernel launched with
    assert tk.LAST_TILES == {"fwd": "128x64 w4 s1", "dq": "64x64 w4 s1", "dkdv": "64x128 w4 s1"}
    # padding inside the key range (holes, left padding): keys the masked loops must drop
    for mode, softcap in (("random", 10.0), ("left", 0.0)):
        mask = _mask(mode, 3, 140, device)
        _, _, grads = _padded_case(mask, 3, 140, 2, 1, D, torch.float16, device, softcap)
        for g in grads:
            assert (g[~mask] == 0).all(), "padded positions must get zero gradient"


@pytest.mark.parametrize("D,big,atomic,softcap", [(64, False, False, 0.0), (64, False, False, 30.0), (128, False, False, 0.0),
                                                  (128, True, False, 0.0), (128, True, False, 30.0), (128, True, True, 0.0),
                                                  (128, "split", False, 0.0)])
@pytest.mark.parametrize("mode,noted", [("left", True), ("left", False), ("third", False)])
def test_padding_contents_never_reach_valid_tokens(monkeypatch, device, D, big, atomic, softcap, mode, noted):
    """Left / right padding (no holes): whatever q, k, v and dO hold at padded positions
    (here NaN against zeros), the output and the three gradients at valid positions are the
    same to the bit, and at padded positions exactly 0 (a NaN gradient there would reach the
    projections' weight gradients). The dK/dV kernel starts its query blocks below the first
    valid row (aligned) and must not let those rows in (at D = 128: its one-loop path; big:
    the GPU's 64-row tiles; atomic: the atomic backward, which starts at the first valid
    row); softcap: its derivative at padded keys. noted: the mask noted hole-free (the
    forward's and dQ's MASK_HOLES off), as hf PaddingInfo does."""
    from llm2vec_fast import _tensor_cache as tc

    monkeypatch.setattr(tc, "_HOLE_FREE", [None])
    if big:
        dkdv = tk._cfg(64, 128, 8, 1, split=True) if big == "split" else tk._cfg(64, 128, 4, 1)
        monkeypatch.setattr(tk, "heuristic_config", lambda kind, *a, **kw: dkdv if kind.startswith("dkdv")
                            else tk._cfg(64, 64, 4, 1) if kind == "dq" else tk._cfg(128, 64, 4, 1))
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_BWD", "atomic" if atomic else "separate")
    mask = _mask(mode, 3, 150, device)
    launched = []
    real = tk._launch
    monkeypatch.setattr(tk, "_launch", lambda kind, *a, **kw: launched.append((kind, a[3].get("MASK_HOLES")))
                        or real(kind, *a, **kw))
    clean, poisoned = _poisoned_padding_runs(mask, (3, 150, 2, D), device, noted, softcap)
    assert {h for k, h in launched if k in ("fwd", "dq")} == {not noted}, launched
    _assert_padding_never_leaks(mask, clean, poisoned)


def _poisoned_padding_runs(mask, shape, device, noted: bool, softcap: float = 0.0):
    """Forward + backward (fp16, fresh q, k, v, dO of ``shape``) with the positions ``mask``
    drops set to 0, then to NaN: ``(out, dq, dk, dv)`` of each run. ``noted``: the mask noted
    hole-free first (as hf PaddingInfo notes left / right padding)."""
    from llm2vec_fast import _tensor_cache as tc

    base = [torch.randn(*shape, device=device, dtype=torch.float16) for _ in range(4)]  # q, k, v, dO

    def run(fill):
        q, k, v, do = (t.clone() for t in base)
        for t in (q, k, v, do):
            t[~mask] = fill
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        m = mask.clone()
        if noted:
            tc.note_hole_free(m)
        out = flash_attn_noncausal(q, k, v, m, backend="triton", softcap=softcap)
        out.backward(do)
        return [out] + [t.grad for t in (q, k, v)]

    return run(0.0), run(float("nan"))


def _assert_padding_never_leaks(mask, clean, poisoned):
    """Valid positions the same to the bit in both runs of :func:`_poisoned_padding_runs` and
    finite; padded positions exactly 0 in the poisoned one."""
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, poisoned):
        assert torch.isfinite(b[mask]).all(), f"{name}: padding leaked into valid positions"
        assert torch.equal(a[mask], b[mask]), f"{name}: valid positions changed with the padding's contents"
        assert (b[~mask] == 0).all(), f"{name}: padded positions must be 0 whatever they hold"


def test_unsupported_falls_back_with_warning(device):
    q = torch.randn(5, 2, 48, device=device)
    cu = _cu([5], device)
    assert tk.unsupported_reason(q) is not None
    assert tk.unsupported_reason(q[..., :32].contiguous(), dropout_p=0.1) is None  # dropout runs in the kernels
    assert tk.unsupported_reason(q.double()[..., :32]) is not None
    with pytest.warns(RuntimeWarning, match="does not support"):
        out = flash_attn_varlen_noncausal(q, q, q, cu, cu, 5, 5, backend="triton")
    assert max_err(out, ref.attention_varlen_ref(q, q, q, cu, cu)) < 1e-5


def test_eager_calls_skip_the_custom_op(device, monkeypatch):
    """Eager mode runs the plain autograd function (the custom op's dispatch cost 2/3 of the
    per-call glue on a host-bound step), no-grad calls the bare launcher; torch.compile keeps
    the custom op (the compile tests below). Same numbers either way."""
    from llm2vec_fast.kernels.triton import attention as tk

    calls = []
    real = tk._attn_fwd_op
    monkeypatch.setattr(tk, "_attn_fwd_op", lambda *a: calls.append(1) or real(*a))
    q, k, v = (torch.randn(1, 19, 2, 32, device=device, requires_grad=True) for _ in range(3))
    out = flash_attn_noncausal(q, k, v, backend="triton")
    assert type(out.grad_fn).__name__ == "_AttnFnBackward"
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    with torch.no_grad():
        out_ng = flash_attn_noncausal(q, k, v, backend="triton")
    assert out_ng.grad_fn is None and not calls
    op_out = real(q, k, v, None, None, None, 19, 19, 32 ** -0.5, 0.0)[0]
    torch.testing.assert_close(out, op_out, rtol=0, atol=0)
    torch.testing.assert_close(out_ng, op_out, rtol=0, atol=0)
    for a, b in zip(grads, torch.autograd.grad(op_out, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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
        seed = torch.empty(1, dtype=torch.int64)  # dropout: the seed tensor travels through both ops
        out, lse = torch.ops.llm2vec_fast.attn_fwd(qp, qp, qp, None, None, None, 9, 9, 0.125, 0.0, 0.3, seed)
        assert out.shape == qp.shape and lse.shape == (2, 4, 9)
        dq, dk, dv = torch.ops.llm2vec_fast.attn_bwd(qp, qp, qp, qp, qp, lse, None, None, None, 9, 9, 0.125, 0.0, 0.3, seed)
        assert dv.shape == qp.shape
    del mode


# --------------------------------------------------------------------------------------
# The atomic backward: one dK/dV kernel that also accumulates dQ with atomics
# --------------------------------------------------------------------------------------


@pytest.fixture
def atomic_bwd(monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_BWD", "atomic")
    tk.LAST_TILES.clear()
    yield
    # the backward ran the atomic kernels, not the separate dQ kernel
    assert "dkdv_atomic" in tk.LAST_TILES and "dq" not in tk.LAST_TILES, tk.LAST_TILES


# Every head dim and both dtypes once, GQA ratios 1 / 4 / 8.
ATOMIC_HEAD_CASES = [
    (32, torch.float16, 8), (64, torch.float32, 4), (80, torch.float16, 4),
    (96, torch.float32, 1), (128, torch.float16, 8), (256, torch.float32, 1),
]


@pytest.mark.parametrize("D,dtype,ratio", ATOMIC_HEAD_CASES, ids=[f"d{d}-{str(t)[6:]}-g{r}" for d, t, r in ATOMIC_HEAD_CASES])
def test_atomic_backward_varlen(D, dtype, ratio, device, atomic_bwd):
    Hkv = 1 if ratio > 1 else 2
    lens = [1, 17, 97, 130] if D < 256 else [1, 17, 40]
    _varlen_case(lens, Hkv * ratio, Hkv, D, dtype, device)


@pytest.mark.parametrize("mode,dtype,softcap", [("random", torch.float16, 0.0), ("left", torch.float32, 10.0),
                                                ("third", torch.float16, 0.0), ("none", torch.float32, 0.0)])
def test_atomic_backward_padded(mode, dtype, softcap, device, atomic_bwd):
    B, S, H, Hkv, D = 3, 97, 4, 2, 64
    mask = _mask(mode, B, S, device)
    out, lse, grads = _padded_case(mask, B, S, H, Hkv, D, dtype, device, softcap)
    if mask is not None:
        for g in grads:
            assert (g[~mask] == 0).all(), "padded positions must get zero gradient"


def test_atomic_backward_with_dropout(device, atomic_bwd):
    # GPU tiles exist only without dropout; the kernel itself handles it (forced here).
    _dropout_varlen_case([33, 5, 0], 4, 1, 64, torch.float16, device, 0.3, 5.0)


def test_atomic_and_separate_agree(device, monkeypatch):
    lens = [70, 1, 45]
    cu = _cu(lens, device)
    q = torch.randn(116, 4, 64, device=device, requires_grad=True)
    k, v = (torch.randn(116, 2, 64, device=device, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    grads = {}
    for mode in ("separate", "atomic"):
        monkeypatch.setenv("LLM2VEC_FAST_ATTN_BWD", mode)
        out = flash_attn_varlen_noncausal(q, k, v, cu, cu, 70, 70, backend="triton")
        grads[mode] = torch.autograd.grad(out, (q, k, v), do)
    for a, b in zip(grads["separate"], grads["atomic"]):
        assert max_err(a, b) < 1e-4  # fp32: only the summation order of dQ differs
    torch.testing.assert_close(grads["separate"][1], grads["atomic"][1], rtol=0, atol=0)  # dK, dV: same code
    torch.testing.assert_close(grads["separate"][2], grads["atomic"][2], rtol=0, atol=0)


def test_bwd_mode_rules(monkeypatch):
    monkeypatch.delenv("LLM2VEC_FAST_ATTN_BWD", raising=False)
    assert tk.bwd_mode() == tk.BWD_MODE
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_BWD", "atomic")
    assert tk.bwd_mode() == "atomic"  # interpreter: every case
    assert tk.bwd_mode(deterministic=True) == "separate"
    assert tk.bwd_mode(on_cuda=True, head_dim=128) == "atomic"
    assert tk.bwd_mode(on_cuda=True, head_dim=128, dropout=True) == "separate"  # no GPU tiles for these
    assert tk.bwd_mode(on_cuda=True, head_dim=32) == "separate"
    assert tk.bwd_mode(on_cuda=True, head_dim=64, fp32=True) == "separate"
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_BWD", "auto")
    assert tk.bwd_mode() == "separate" and tk.bwd_mode(on_cuda=True, head_dim=80) == "auto"
    for hd in tk.SUPPORTED_HEAD_DIMS:  # GPU tiles exist exactly where the rule says
        for chip in tk.CHIPS:
            assert bool(tk.bwd_dkdv_atomic_configs(hd, False, False, chip)) == tk.atomic_bwd_supported(hd, False, False)
            assert not tk.bwd_dkdv_atomic_configs(hd, True, False, chip) and not tk.bwd_dkdv_atomic_configs(hd, False, True, chip)


def test_deterministic_overrides_atomic(device, monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_BWD", "atomic")
    tk.LAST_TILES.clear()
    q, k, v = (torch.randn(1, 40, 2, 32, device=device, requires_grad=True) for _ in range(3))
    flash_attn_noncausal(q, k, v, backend="triton", deterministic=True).sum().backward()
    assert "dq" in tk.LAST_TILES and "dkdv_atomic" not in tk.LAST_TILES


def test_bad_bwd_mode_fails_before_any_kernel(device, monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_BWD", "fast")
    tk.LAST_TILES.clear()
    q = torch.randn(1, 8, 2, 32, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="LLM2VEC_FAST_ATTN_BWD"):
        flash_attn_noncausal(q, q, q, backend="triton")
    assert not tk.LAST_TILES


def test_auto_mode_times_both_once(monkeypatch):
    import triton.testing

    times = {"separate": 2.0, "atomic": 1.0}
    calls = []

    def fake_bench(fn, warmup=0, rep=0):
        calls.append(fn)
        return times["separate" if len(calls) % 2 else "atomic"]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(tk, "_BWD_CHOICE", {})
    ran = []
    assert tk._timed_choice("k", ran.append) == "atomic"
    assert tk._timed_choice("k", ran.append) == "atomic" and len(calls) == 2  # cached per case
    for fn in calls:
        fn()
    assert ran == ["separate", "atomic"]


def test_auto_mode_in_the_launcher(device, monkeypatch):
    """The launcher's "auto" branch (CUDA only otherwise): both strategies run through the
    timing hook once, the faster is kept, and the gradients are right either way."""
    import triton.testing

    ran = []

    def fake_bench(fn, warmup=0, rep=0):
        tk.LAST_TILES.clear()
        fn()
        ran.append("dkdv_atomic" in tk.LAST_TILES)
        return 1.0 if ran[-1] else 2.0  # atomic "faster"

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(tk, "_BWD_CHOICE", {})
    monkeypatch.setattr(tk, "bwd_mode", lambda *a, **k: "auto")
    monkeypatch.setattr(tk, "chip_of", lambda dev: 90)
    _varlen_case([30, 1, 45], 4, 2, 64, torch.float32, device)
    assert ran == [False, True] and list(tk._BWD_CHOICE.values()) == ["atomic"]


def test_atomic_tuner_zeroes_the_accumulator():
    # The autotuner times each config by launching it: every launch must start from a zero dQ.
    tuner = tk._tuned("dkdv_atomic", 128, False, False, 90)
    assert len(tuner.configs) == len(tk.BWD_DKDV_ATOMIC_CONFIGS[128])
    for c in tuner.configs:
        acc = torch.ones(3, 4)
        c.pre_hook({"DQ": acc})
        assert (acc == 0).all()


# --------------------------------------------------------------------------------------
# Attention dropout in the kernels
# --------------------------------------------------------------------------------------


def _next_seed(device):
    """The seed the next dropout call will draw: the same draw from a forked RNG state."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return tk.dropout_seed(device)


def _masked_attention(q, k, v, key_mask, keep, p, scale, softcap, upcast):
    """Padded attention with an explicit dropout keep mask: ``O = (P * keep / (1 - p)) V``.

    q ``(B, S, H, D)``, k / v ``(B, S, Hkv, D)``, key_mask ``(B, S)`` bool or None, keep
    ``(B, H, S, S)`` bool. The lse is the undropped softmax's; padded query rows (and rows
    of a sequence without keys) are 0 with lse ``-inf``, as in ``attention_padded_ref``.
    Computes in fp32 / fp64 with ``upcast`` (fp64 stays fp64), else in the input dtype.
    """
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else (torch.float32 if upcast else q.dtype)
    qh = q.to(cdt).permute(0, 2, 1, 3)
    kh = k.to(cdt).permute(0, 2, 1, 3).repeat_interleave(H // Hkv, dim=1)
    vh = v.to(cdt).permute(0, 2, 1, 3).repeat_interleave(H // Hkv, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", qh, kh) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if key_mask is not None:
        m = key_mask | ~key_mask.any(dim=-1, keepdim=True)
        s = s.masked_fill(~m[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.exp(s - lse[..., None]) * keep.to(cdt) / (1.0 - p)
    o = torch.einsum("bhqk,bhkd->bhqd", probs, vh)
    lse = lse.float()
    if key_mask is not None:
        o = o * key_mask[:, None, :, None].to(cdt)
        lse = lse.masked_fill(~key_mask[:, None, :], float("-inf"))
    return o.permute(0, 2, 1, 3).to(q.dtype), lse


def _masked_attention_varlen(q, k, v, lens, keep, p, scale, softcap, upcast):
    """Varlen attention with the explicit mask ``keep (B, H, max_len, max_len)``, per sequence."""
    outs, lses, t = [], [], 0
    H = q.shape[1]
    for b, n in enumerate(lens):
        if n == 0:
            continue
        sl = slice(t, t + n)
        o, lse = _masked_attention(q[None, sl], k[None, sl], v[None, sl], None, keep[b:b + 1, :, :n, :n], p, scale, softcap, upcast)
        outs.append(o[0])
        lses.append(lse[0].reshape(H, n))
        t += n
    return torch.cat(outs, 0), torch.cat(lses, 1)


def _dropout_varlen_case(lens, H, Hkv, D, dtype, device, p, softcap=0.0):
    cu = _cu(lens, device)
    T, mx = sum(lens), max(lens)
    q, k, v = (torch.randn(T, h, D, device=device) for h in (H, Hkv, Hkv))
    scale = 1.0 / math.sqrt(D)
    keep = tk.dropout_keep_mask(_next_seed(device), len(lens), H, mx, mx, p)

    def fast(q_, k_, v_):
        return flash_attn_varlen_noncausal(q_, k_, v_, cu, cu, mx, mx, scale, softcap, backend="triton", dropout_p=p, return_lse=True)

    def reference(q_, k_, v_, upcast):
        return _masked_attention_varlen(q_, k_, v_, lens, keep, p, scale, softcap, upcast)

    _check(fast, reference, q, k, v, dtype, name=f"dropout {p} varlen lens={lens} H={H}/{Hkv} D={D} {dtype}")
    return keep


def _dropout_padded_case(mode, B, S, H, Hkv, D, dtype, device, p, softcap=0.0):
    mask = _mask(mode, B, S, device)
    q = torch.randn(B, S, H, D, device=device)
    k, v = torch.randn(B, S, Hkv, D, device=device), torch.randn(B, S, Hkv, D, device=device)
    scale = 1.0 / math.sqrt(D)
    keep = tk.dropout_keep_mask(_next_seed(device), B, H, S, S, p)

    def fast(q_, k_, v_):
        return flash_attn_noncausal(q_, k_, v_, mask, scale, softcap, backend="triton", dropout_p=p, return_lse=True)

    def reference(q_, k_, v_, upcast):
        return _masked_attention(q_, k_, v_, mask, keep, p, scale, softcap, upcast)

    out, lse, grads = _check(fast, reference, q, k, v, dtype, name=f"dropout {p} padded {mode} H={H}/{Hkv} D={D} {dtype}")
    if mask is not None:
        assert (out[~mask] == 0).all() and all((g[~mask] == 0).all() for g in grads)


def test_masked_reference_without_dropout_is_the_reference(device):
    # The test's explicit-mask oracle, with every entry kept, is the library's reference.
    B, S, H, Hkv, D = 2, 23, 4, 2, 32
    q = torch.randn(B, S, H, D, dtype=torch.float64)
    k, v = torch.randn(B, S, Hkv, D, dtype=torch.float64), torch.randn(B, S, Hkv, D, dtype=torch.float64)
    mask = _mask("random", B, S, "cpu")
    keep = torch.ones(B, H, S, S, dtype=torch.bool)
    o, lse = _masked_attention(q, k, v, mask, keep, 0.0, 0.2, 4.0, True)
    o_ref, lse_ref = ref.attention_padded_ref(q, k, v, mask, 0.2, 4.0, return_lse=True)
    assert max_err(o, o_ref) < 1e-12 and max_err(lse, lse_ref) < 1e-12


# (lens, H, Hkv, D, dtype, softcap): GQA 1 / 2 / 4, the masked 80-wide head dim, softcap,
# empty and length-1 sequences, lengths crossing the interpreter's 32-wide tiles.
DROPOUT_VARLEN = [
    ([1, 40, 0, 17], 2, 1, 32, torch.float32, 0.0),
    ([33, 5], 4, 1, 64, torch.float16, 5.0),
    ([37], 2, 2, 80, torch.float32, 0.0),
]


@pytest.mark.parametrize(
    "lens,H,Hkv,D,dtype,softcap", DROPOUT_VARLEN, ids=[f"{c[0]}-g{c[1] // c[2]}-d{c[3]}-{str(c[4])[6:]}" for c in DROPOUT_VARLEN]
)
def test_dropout_varlen_matches_explicit_mask(lens, H, Hkv, D, dtype, softcap, device):
    _dropout_varlen_case(lens, H, Hkv, D, dtype, device, 0.3, softcap)


# Holes (and a row without any valid token), left padding with softcap, right padding,
# no mask at all (p = 0.5).
DROPOUT_PADDED = [
    ("random", torch.float16, 0.0), ("left", torch.float32, 3.0), ("third", torch.float32, 0.0), ("none", torch.float16, 0.0),
]


@pytest.mark.parametrize("mode,dtype,softcap", DROPOUT_PADDED, ids=[f"{m}-{str(t)[6:]}" for m, t, _ in DROPOUT_PADDED])
def test_dropout_padded_matches_explicit_mask(mode, dtype, softcap, device):
    _dropout_padded_case(mode, 2, 40, 2, 1, 32, dtype, device, 0.5 if mode == "none" else 0.3, softcap)


@pytest.mark.parametrize("D", [32, 64])
def test_dropout_mask_does_not_depend_on_tiles(D, monkeypatch, device):
    # The CUDA dropout tiles (fwd 64 / 128 rows, dQ 64 x 32, dK/dV 16 / 32 query rows)
    # regenerate the mask the 32 x 32 debug kernel wrote: the RNG counters are positions,
    # not block indices.
    def cuda_tiles(kind, head_dim, fp32, max_seqlen, on_cuda, dropout=False, chip=90, **kw):
        c = tk._configs(kind, head_dim, False, True)[0]
        return tk._cfg(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 4, 1)

    monkeypatch.setattr(tk, "heuristic_config", cuda_tiles)
    _dropout_varlen_case([130, 1], 2, 1, D, torch.float32, device, 0.2)


def _grads_of(fn, q, k, v, do):
    q, k, v = (_leaf(t) for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def test_dropout_seed_reproducibility(device):
    from llm2vec_fast.training.gradcache import RandContext

    lens = [20, 9]
    cu = _cu(lens, device)
    q, k, v = (torch.randn(29, 2, 32, device=device, dtype=torch.float16) for _ in range(3))
    do = torch.randn_like(q)

    def f(q_, k_, v_):
        return flash_attn_varlen_noncausal(q_, k_, v_, cu, cu, 20, 20, backend="triton", dropout_p=0.3)

    torch.manual_seed(3)
    a = _grads_of(f, q, k, v, do)
    torch.manual_seed(3)
    b = _grads_of(f, q, k, v, do)
    for x, y in zip(a, b):  # same seed: bit-identical output and gradients
        assert torch.equal(x, y)
    ctx = RandContext(device)  # GradCache's record / replay of the RNG state
    c = _grads_of(f, q, k, v, do)
    d = _grads_of(f, q, k, v, do)  # the generator moved on: a new mask
    with ctx.replay():
        e = _grads_of(f, q, k, v, do)
    assert not torch.equal(c[0], d[0]) and not torch.equal(a[0], c[0])
    for x, y in zip(c, e):
        assert torch.equal(x, y)


def test_dropout_p0_is_the_no_dropout_path(device):
    # p = 0 runs the DROPOUT=False kernels and draws no seed: bit-identical, RNG untouched.
    B, S, H, D = 2, 37, 2, 32
    q, k, v = (torch.randn(B, S, H, D, device=device, dtype=torch.float16) for _ in range(3))
    mask = _mask("random", B, S, device)
    do = torch.randn_like(q)
    a = _grads_of(lambda *t: flash_attn_noncausal(*t, mask, backend="triton"), q, k, v, do)
    state = torch.get_rng_state()
    b = _grads_of(lambda *t: flash_attn_noncausal(*t, mask, backend="triton", dropout_p=0.0), q, k, v, do)
    assert torch.equal(state, torch.get_rng_state())
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert tk.dropout_keep_mask(tk.dropout_seed(device), 1, 1, 3, 3, 0.0).all()


def test_dropout_under_torch_compile(device):
    # The seed is drawn outside the custom op and passed in: a whole graph (fullgraph), the
    # mask reproducible under torch.manual_seed, gradients through both ops.
    B, S, H, D = 2, 37, 2, 32
    q, k, v = (torch.randn(B, S, H, D, device=device, requires_grad=True) for _ in range(3))
    mask = _mask("third", B, S, device)

    def f(q_, k_, v_):
        return flash_attn_noncausal(q_, k_, v_, mask, backend="triton", dropout_p=0.3).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    a = cf(q, k, v)
    a.backward()
    torch.manual_seed(1)
    assert torch.equal(a, cf(q, k, v)) and not torch.equal(a, cf(q, k, v))
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (q, k, v))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.9])
def test_dropout_keep_statistics(p, device):
    B, H, S = 2, 3, 96
    keep = tk.dropout_keep_mask(tk.dropout_seed(device), B, H, S, S, p).double()
    n = keep.numel()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(float(keep.mean()) - (1 - p)) < 5 * sd
    # Neighbours (next key, next query row, next head, next sequence) are independent:
    # P(both kept) = (1 - p)^2; the streams of different heads and sequences differ.
    pairs = ((keep[..., 1:], keep[..., :-1]), (keep[:, :, 1:], keep[:, :, :-1]), (keep[:, 1:], keep[:, :-1]), (keep[1:], keep[:-1]))
    for a, b in pairs:
        both = float((a * b).mean())
        assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / a.numel()) + 1e-3
    # The kernel drops what the mask says, at that rate: with V = 1 every output is
    # sum_j P_ij keep_ij / (1 - p), whose mean over many rows is 1.
    T, D = 96, 32
    q = torch.randn(T, 2, D, device=device) * 0.1
    v = torch.ones(T, 1, D, device=device)
    cu = _cu([T], device)
    out = flash_attn_varlen_noncausal(q, q[:, :1], v, cu, cu, T, T, backend="triton", dropout_p=p)
    row = out[..., 0].double()
    assert abs(float(row.mean()) - 1.0) < 6 * math.sqrt(p / ((1 - p) * T * T * 2)) + 1e-3
    assert (row > 0).all() or p > 0.5


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


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    lens=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    ratio=st.sampled_from([1, 2, 4]),
    D=st.sampled_from([32, 80]),
)
def test_hypothesis_varlen_layouts_atomic_backward(lens, ratio, D):
    """The atomic backward's row masks (sequence ends, empty sequences) on random layouts."""
    import os

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if sum(lens) == 0:
        lens = lens + [1]
    old = os.environ.get("LLM2VEC_FAST_ATTN_BWD")
    os.environ["LLM2VEC_FAST_ATTN_BWD"] = "atomic"
    try:
        _varlen_case(lens, ratio, 1, D, torch.float16, device)
    finally:
        if old is None:
            del os.environ["LLM2VEC_FAST_ATTN_BWD"]
        else:
            os.environ["LLM2VEC_FAST_ATTN_BWD"] = old

"""GPU tests of the Triton attention (marker ``gpu``): bf16 (wrong in the interpreter), the
compiled autotuned kernels, long sequences, torch.compile, determinism and dropout.

Tolerance: STYLE.md's rule against the fp32 reference (oracle), budget from the reference
run in bf16 (``upcast=False``): 2x for outputs, 3x for gradients.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_close_rule, max_err

pytestmark = pytest.mark.gpu

DEV = "cuda"


@pytest.fixture(autouse=True)
def _heuristic_configs(monkeypatch):
    # The heuristic's configs (no autotuning) keep the compile count, and so the run, short;
    # test_heuristic_path_matches_autotuned turns the autotuner on and compares the two.
    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "0")


def _ops():
    from llm2vec_fast.ops.attention import flash_attn_noncausal, flash_attn_varlen_noncausal

    return flash_attn_noncausal, flash_attn_varlen_noncausal


def _grads(out, inputs, do):
    return torch.autograd.grad(out, inputs, do)


def _check_padded(B, S, H, Hkv, D, dtype, mask, softcap=0.0):
    from llm2vec_fast.kernels.reference import attention_padded_ref

    padded, _ = _ops()
    q = torch.randn(B, S, H, D, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(B, S, Hkv, D, device=DEV, dtype=dtype, requires_grad=True)
    v = torch.randn(B, S, Hkv, D, device=DEV, dtype=dtype, requires_grad=True)
    scale = 1.0 / math.sqrt(D)
    out, lse = padded(q, k, v, mask, scale, softcap, backend="triton", return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    do = torch.randn_like(out)
    g = _grads(out, (q, k, v), do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    o_or, l_or = attention_padded_ref(q32, k32, v32, mask, scale, softcap, upcast=True, return_lse=True)
    g_or = _grads(o_or, (q32, k32, v32), do.float())
    o_nat, l_nat = attention_padded_ref(q, k, v, mask, scale, softcap, upcast=False, return_lse=True)
    g_nat = _grads(o_nat, (q, k, v), do)
    assert_close_rule(out, o_or, o_nat, atol=1e-3, name="out")
    assert_close_rule(lse, l_or, l_nat, atol=1e-3, name="lse")
    for n, a, b, c in zip("qkv", g, g_or, g_nat):
        assert_close_rule(a, b, c, factor=3.0, atol=1e-3, name=f"d{n}")


@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
def test_bf16_padded_head_dims(D):
    B, S = 3, 333
    mask = torch.rand(B, S, device=DEV) > 0.3
    mask[1, 200:] = False
    _check_padded(B, S, 8, 2, D, torch.bfloat16, mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_unpadded_gqa(dtype):
    _check_padded(1, 2048 + 17, 8, 1, 128, dtype, None)


@pytest.mark.parametrize("D,softcap,bwd", [(128, 0.0, "separate"), (80, 20.0, "separate"), (128, 0.0, "atomic")])
def test_bf16_dense_even_rows(D, softcap, bwd, monkeypatch):
    """Dense layout with S a multiple of EVEN_M_ROWS: the dK/dV kernels without row masks."""
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_BWD", bwd)
    _check_padded(2, 1024, 8, 2, D, torch.bfloat16, None, softcap)


@pytest.mark.parametrize("layout", ["right", "left", "varlen"])
def test_bf16_split_tile_option(layout, monkeypatch):
    """The dK/dV tile option SPLIT_M (unmasked interior query blocks) on the GPU, bf16."""
    from llm2vec_fast.kernels.triton import attention as tk

    split = tk._cfg(64, 128, 8, 1, split=True)
    real = tk.heuristic_config
    monkeypatch.setattr(tk, "heuristic_config", lambda kind, *a, **kw: split if kind == "dkdv" else real(kind, *a, **kw))
    B, S = 3, 700
    pos = torch.arange(S, device=DEV)[None]
    lens = torch.tensor([700, 333, 65], device=DEV)
    mask = pos >= S - lens[:, None] if layout == "left" else pos < lens[:, None]
    if layout == "varlen":
        _, varlen = _ops()
        from llm2vec_fast.kernels.reference import attention_varlen_ref

        cu = torch.zeros(B + 1, dtype=torch.int32, device=DEV)
        cu[1:] = torch.cumsum(lens, 0)
        T = int(cu[-1])
        q, k, v = (torch.randn(T, h, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2))
        out = varlen(q, k, v, cu, cu, S, S, backend="triton")
        do = torch.randn_like(out)
        g = _grads(out, (q, k, v), do)
        ref32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
        g_or = _grads(attention_varlen_ref(*ref32, cu, cu, 128 ** -0.5, 0.0, upcast=True), ref32, do.float())
        g_nat = _grads(attention_varlen_ref(q, k, v, cu, cu, 128 ** -0.5, 0.0, upcast=False), (q, k, v), do)
        for n, a, b, c in zip("qkv", g, g_or, g_nat):
            assert_close_rule(a, b, c, factor=3.0, atol=1e-3, name=f"d{n}")
    else:
        _check_padded(B, S, 8, 2, 128, torch.bfloat16, mask)
    assert tk.LAST_TILES["dkdv"] == "64x128 w8 s1 split"


@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("layout", ["dense", "right", "varlen"])
def test_bf16_tma_tiles(D, layout, monkeypatch):
    """Every TMA tile of the forward's list (host descriptors) and of the dQ and dK/dV kernels'
    (descriptors made in the kernel, bounded to each sequence) on the GPU, bf16, against the
    reference: dense, right padding noted hole-free (as hf PaddingInfo notes it), packed
    sequences whose tail blocks read into the next one (left padding: the interpreter tests)."""
    from llm2vec_fast import _tensor_cache as tc
    from llm2vec_fast.kernels.reference import attention_varlen_ref
    from llm2vec_fast.kernels.triton import attention as tk

    monkeypatch.setattr(tc, "_HOLE_FREE", [None])
    real = tk.heuristic_config
    B, S = 3, 700
    pos = torch.arange(S, device=DEV)[None]
    lens = torch.tensor([700, 333, 65], device=DEV)
    tiles = [("fwd", c) for c in tk.fwd_configs(D) if c.kwargs.get("TMA")]
    tiles += [("dq", c) for c in tk.bwd_dq_configs(D) if c.kwargs.get("TMA")]
    tiles += [("dkdv", c) for c in tk.bwd_dkdv_configs(D) if c.kwargs.get("TMA")]
    assert {k for k, _ in tiles} == {"fwd", "dq", "dkdv"}
    for which, tile in tiles:
        monkeypatch.setattr(tk, "heuristic_config", lambda kind, *a, tma=False, **kw: tile if kind == which and tma
                            else real(kind, *a, tma=tma, **kw))
        if layout == "varlen":
            _, varlen = _ops()
            cu = torch.zeros(B + 1, dtype=torch.int32, device=DEV)
            cu[1:] = torch.cumsum(lens, 0)
            T = int(cu[-1])
            q, k, v = (torch.randn(T, h, D, device=DEV, dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2))
            out = varlen(q, k, v, cu, cu, S, S, backend="triton")
            do = torch.randn_like(out)
            g = _grads(out, (q, k, v), do)
            ref32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
            o_or = attention_varlen_ref(*ref32, cu, cu, D ** -0.5, 0.0, upcast=True)
            o_nat = attention_varlen_ref(q, k, v, cu, cu, D ** -0.5, 0.0, upcast=False)
            assert_close_rule(out, o_or, o_nat, atol=1e-3, name="out")
            g_or, g_nat = _grads(o_or, ref32, do.float()), _grads(o_nat, (q, k, v), do)
            for n, a, b, c in zip("qkv", g, g_or, g_nat):
                assert_close_rule(a, b, c, factor=3.0, atol=1e-3, name=f"d{n}")
        else:
            mask = None if layout == "dense" else pos < lens[:, None]
            if mask is not None:
                tc.note_hole_free(mask)
            _check_padded(B, S, 8, 2, D, torch.bfloat16, mask)
        assert tk.LAST_TILES[which] == tk.tile_name(tile)


def test_bf16_right_left_padding_softcap():
    B, S = 4, 700
    lens = torch.tensor([700, 1, 350, 0], device=DEV)
    pos = torch.arange(S, device=DEV)[None]
    mask = pos < lens[:, None]
    mask[2] = pos[0] >= S - 350  # left padding
    _check_padded(B, S, 4, 4, 64, torch.bfloat16, mask, softcap=20.0)


def test_bf16_varlen_matches_padded():
    padded, varlen = _ops()
    lens = [1, 17, 97, 130, 0, 1000]
    B, S, H, Hkv, D = len(lens), max(lens), 8, 2, 128
    mask = torch.arange(S, device=DEV)[None] < torch.tensor(lens, device=DEV)[:, None]
    q = torch.randn(B, S, H, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(B, S, Hkv, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, D, device=DEV, dtype=torch.bfloat16)
    idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=DEV)
    cu[1:] = torch.cumsum(torch.tensor(lens, device=DEV), 0)
    o_p = padded(q, k, v, mask, backend="triton")
    o_v = varlen(*(t.reshape(B * S, -1, D)[idx] for t in (q, k, v)), cu, cu, S, S, backend="triton")
    assert max_err(o_p.reshape(B * S, H, D)[idx], o_v) <= 1e-2
    assert (o_p.reshape(B * S, H, D)[~mask.reshape(-1)] == 0).all()


def test_deterministic_backward():
    padded, _ = _ops()
    q = torch.randn(2, 1024, 16, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 1024, 2, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 1024, 2, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    g1 = _grads(padded(q, k, v, backend="triton", deterministic=True), (q, k, v), do)
    g2 = _grads(padded(q, k, v, backend="triton", deterministic=True), (q, k, v), do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def _compile_inputs():
    """bf16 q, k, v (2, 128, 4, 64) needing grad and a mask whose second row pads from 100."""
    q, k, v = (torch.randn(2, 128, 4, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    m = torch.ones(2, 128, dtype=torch.bool, device=DEV)
    m[1, 100:] = False
    return q, k, v, m


def test_torch_compile_no_graph_break():
    padded, _ = _ops()

    def f(q, k, v, m):
        return padded(q, k, v, m, backend="triton").float().sum()

    q, k, v, m = _compile_inputs()
    cf = torch.compile(f, fullgraph=True)
    loss = cf(q, k, v, m)
    loss.backward()
    ref = f(q, k, v, m)
    assert torch.allclose(loss, ref, rtol=1e-3)


def test_heuristic_path_matches_autotuned(monkeypatch):
    padded, _ = _ops()
    q = torch.randn(2, 1000, 8, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(2, 1000, 8, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(2, 1000, 8, 128, device=DEV, dtype=torch.bfloat16)
    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "1")
    a = padded(q, k, v, backend="triton")
    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "0")
    b = padded(q, k, v, backend="triton")
    assert max_err(a, b) <= 2e-2



def test_autotuned_repeat_launches_directly_and_matches(monkeypatch):
    """A shape's second autotuned forward + backward launches each kernel with the config the
    autotuner picked (``launch_tuned``: no ``Autotuner.run``) and gives bit-identical output and
    gradients (the same compiled kernels on the same tiles); masked and dense layouts."""
    import triton.runtime.autotuner as at

    padded, _ = _ops()
    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "1")
    runs = []
    real = at.Autotuner.run
    monkeypatch.setattr(at.Autotuner, "run", lambda self, *a, **k: (runs.append(self), real(self, *a, **k))[1])
    for mask in (None, torch.arange(700, device=DEV)[None, :] < torch.tensor([[700], [333]], device=DEV)):
        q, k, v = (torch.randn(2, 700, 8, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn(2, 700, 8, 128, device=DEV, dtype=torch.bfloat16)
        results = []
        for _ in range(2):
            before = len(runs)
            out = padded(q, k, v, mask, backend="triton")
            results.append((out, *_grads(out, (q, k, v), do)))
            results[-1] = results[-1] + (len(runs) - before,)
        assert results[1][-1] == 0  # the first call tuned (or found a pick an earlier test made), the second direct
        for a, b in zip(results[0][:-1], results[1][:-1]):
            assert torch.equal(a, b)

# --------------------------------------------------------------------------------------
# The atomic backward (dQ accumulated by the dK/dV kernel): every GPU tile, autotuned, auto
# --------------------------------------------------------------------------------------


def _atomic_tiles():
    from llm2vec_fast.kernels.triton import attention as tk

    return [(hd, c) for hd in (64, 128) for c in tk.BWD_DKDV_ATOMIC_CONFIGS[hd]]


@pytest.mark.parametrize("D,cfg", _atomic_tiles(), ids=[f"d{d}-{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}"
                                                      for d, c in _atomic_tiles()])
def test_bf16_atomic_backward_every_tile(D, cfg, monkeypatch):
    from llm2vec_fast.kernels.triton import attention as tk

    real = tk.heuristic_config
    monkeypatch.setattr(tk, "heuristic_config", lambda kind, *a, **kw: cfg if kind == "dkdv_atomic" else real(kind, *a, **kw))
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_BWD", "atomic")
    tk.LAST_TILES.clear()
    B, S = 3, 333
    mask = torch.rand(B, S, device=DEV) > 0.3
    mask[1, 200:] = False
    _check_padded(B, S, 8, 2, D, torch.bfloat16, mask, softcap=20.0 if D == 64 else 0.0)
    assert "dq" not in tk.LAST_TILES and tk.LAST_TILES["dkdv_atomic"] == tk.tile_name(cfg)


@pytest.mark.parametrize("D", [64, 128])
def test_atomic_backward_autotuned(D, monkeypatch):
    # The autotuner launches each tile several times on the real buffers: its pre-hook must
    # zero the dQ accumulator before each launch, the final one included.
    from llm2vec_fast.kernels.triton import attention as tk

    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "1")
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_BWD", "atomic")
    tk.LAST_TILES.clear()  # another test in this worker may have run the separate backward
    _check_padded(2, 1500, 8, 2, D, torch.bfloat16, None)
    lens = torch.tensor([1500, 700], device=DEV)
    _check_padded(2, 1500, 8, 8, D, torch.bfloat16, torch.arange(1500, device=DEV)[None] < lens[:, None])
    assert "dq" not in tk.LAST_TILES


def test_auto_backward_mode(monkeypatch):
    from llm2vec_fast.kernels.triton import attention as tk

    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "1")
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_BWD", "auto")
    monkeypatch.setattr(tk, "_BWD_CHOICE", {})
    _check_padded(2, 1024, 8, 2, 128, torch.bfloat16, None)
    assert list(tk._BWD_CHOICE.values()) in (["separate"], ["atomic"])


# --------------------------------------------------------------------------------------
# Attention dropout: the kernels against an explicit-mask reference, in bf16
# --------------------------------------------------------------------------------------


def _dropout_seed_and_mask(B, H, S, p):
    """The seed the next dropout call draws (from a forked CUDA RNG state) and its mask."""
    from llm2vec_fast.kernels.triton import attention as tk

    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        seed = tk.dropout_seed(torch.device(DEV))
    return tk.dropout_keep_mask(seed, B, H, S, S, p)


@pytest.mark.parametrize("D,H,Hkv,softcap", [(128, 8, 2, 0.0), (64, 4, 4, 20.0), (256, 4, 1, 0.0)])
def test_bf16_dropout_matches_explicit_mask(D, H, Hkv, softcap):
    from test_attention_triton import _masked_attention

    padded, _ = _ops()
    B, S, p = 3, 333, 0.3
    mask = torch.rand(B, S, device=DEV) > 0.2
    mask[1, 150:] = False
    mask[2, :7] = False  # a span that starts off a multiple of 4
    q = torch.randn(B, S, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, S, Hkv, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, S, Hkv, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    scale = 1.0 / math.sqrt(D)
    keep = _dropout_seed_and_mask(B, H, S, p)
    out, lse = padded(q, k, v, mask, scale, softcap, backend="triton", dropout_p=p, return_lse=True)
    assert not torch.isnan(out).any()
    do = torch.randn_like(out)
    g = _grads(out, (q, k, v), do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    o_or, l_or = _masked_attention(q32, k32, v32, mask, keep, p, scale, softcap, True)
    g_or = _grads(o_or, (q32, k32, v32), do.float())
    o_nat, l_nat = _masked_attention(q, k, v, mask, keep, p, scale, softcap, False)
    g_nat = _grads(o_nat, (q, k, v), do)
    assert_close_rule(out, o_or, o_nat, atol=1e-3, name="out")
    assert_close_rule(lse, l_or, l_nat, atol=1e-3, name="lse")
    for n, a, b, c in zip("qkv", g, g_or, g_nat):
        assert_close_rule(a, b, c, factor=3.0, atol=1e-3, name=f"d{n}")


def test_bf16_dropout_varlen_matches_explicit_mask():
    from test_attention_triton import _masked_attention_varlen

    _, varlen = _ops()
    lens, H, Hkv, D, p = [1, 130, 0, 517, 64], 8, 2, 128, 0.3
    T, mx = sum(lens), max(lens)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=DEV)
    cu[1:] = torch.cumsum(torch.tensor(lens, device=DEV), 0)
    q = torch.randn(T, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(T, Hkv, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(T, Hkv, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    scale = 1.0 / math.sqrt(D)
    keep = _dropout_seed_and_mask(len(lens), H, mx, p)
    out = varlen(q, k, v, cu, cu, mx, mx, scale, backend="triton", dropout_p=p)
    do = torch.randn_like(out)
    g = _grads(out, (q, k, v), do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    o_or, _ = _masked_attention_varlen(q32, k32, v32, lens, keep, p, scale, 0.0, True)
    g_or = _grads(o_or, (q32, k32, v32), do.float())
    o_nat, _ = _masked_attention_varlen(q, k, v, lens, keep, p, scale, 0.0, False)
    g_nat = _grads(o_nat, (q, k, v), do)
    assert_close_rule(out, o_or, o_nat, atol=1e-3, name="out")
    for n, a, b, c in zip("qkv", g, g_or, g_nat):
        assert_close_rule(a, b, c, factor=3.0, atol=1e-3, name=f"d{n}")


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_bf16_dropout_statistics(p):
    # The keep rate of a large mask, and what the kernels do with it: with V = 1 each output
    # is sum_j P_ij keep_ij / (1 - p), whose mean over 32 heads x 4096 rows is 1.
    from llm2vec_fast.kernels.triton import attention as tk

    padded, _ = _ops()
    keep = tk.dropout_keep_mask(tk.dropout_seed(torch.device(DEV)), 2, 8, 1024, 1024, p)
    n = keep.numel()
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    S, H = 4096, 32
    q = (torch.randn(1, S, H, 128, device=DEV) * 0.1).to(torch.bfloat16)
    v = torch.ones(1, S, 1, 128, device=DEV, dtype=torch.bfloat16)
    out = padded(q, q[:, :, :1], v, backend="triton", dropout_p=p)[..., 0].double()
    assert abs(out.mean().item() - 1.0) < 6 * math.sqrt(p / ((1 - p) * S * S * H)) + 4e-3
    torch.manual_seed(11)
    a = padded(q, q[:, :, :1], v, backend="triton", dropout_p=p)
    torch.manual_seed(11)
    b = padded(q, q[:, :, :1], v, backend="triton", dropout_p=p)
    assert torch.equal(a, b)


def test_dropout_autotuned_matches_heuristic(monkeypatch):
    # Every dropout configuration regenerates the same mask: the autotuner's pick and the
    # heuristic's agree for the same seed (output and gradients).
    padded, _ = _ops()
    q = torch.randn(2, 1000, 8, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 1000, 2, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 1000, 2, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    res = []
    for tune in ("1", "0"):
        monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", tune)
        torch.manual_seed(3)
        out = padded(q, k, v, backend="triton", dropout_p=0.3)
        res.append((out, *_grads(out, (q, k, v), do)))
    for a, b in zip(*res):
        assert max_err(a, b) <= 2e-2 * max(1.0, float(b.abs().max()))


def test_torch_compile_with_dropout():
    padded, _ = _ops()

    def f(q, k, v, m):
        return padded(q, k, v, m, backend="triton", dropout_p=0.3).float().sum()

    q, k, v, m = _compile_inputs()
    cf = torch.compile(f, fullgraph=True)
    cf(q, k, v, m).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))

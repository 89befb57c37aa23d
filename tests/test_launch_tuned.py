"""Host-side launch helpers (``llm2vec_fast/kernels/triton/_tiles.py``): integer grid
arithmetic equal to Triton's, and ``launch_tuned``, which goes through the autotuner the first
time a key is seen and launches the picked config directly afterwards.

The autotuner cannot time configs without a GPU; here its ``_bench`` is replaced by fixed
timings, so the real ``Autotuner.run`` picks a config and launches it under the interpreter.
"""
from __future__ import annotations

import functools

import pytest
import torch
import triton
import triton.language as tl

from llm2vec_fast.kernels.triton import _tiles

pytestmark = pytest.mark.interpreter


def test_host_grid_arithmetic_matches_triton():
    for a in range(0, 2100, 7):
        for b in (1, 2, 3, 16, 64, 128, 4096):
            assert _tiles.cdiv(a, b) == triton.cdiv(a, b)
    for n in list(range(0, 4200)) + [2 ** 17 - 1, 2 ** 17, 2 ** 17 + 1, 151936]:
        assert _tiles.next_power_of_2(n) == triton.next_power_of_2(n), n


@triton.jit
def _count_add_one(x, y, programs, n, BLOCK: tl.constexpr):
    tl.atomic_add(programs, 1)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(y + i, tl.load(x + i, mask=m) + 1, mask=m)


def _tuner(configs, fastest):
    t = triton.autotune(configs=configs, key=["n"])(_count_add_one)
    t._bench = lambda *a, config, **k: 1.0 if config is fastest else 2.0  # no GPU to time on
    runs = []
    real_run = t.run
    t.run = lambda *a, **k: (runs.append(k.get("n", a[3] if len(a) > 3 else None)), real_run(*a, **k))[1]
    return t, runs


def _launch(t, n, dtype=torch.float32):
    x = torch.randn(n).to(dtype)
    y = torch.full((n,), float("nan")).to(dtype)
    programs = torch.zeros(1, dtype=torch.int32)
    cfg = _tiles.launch_tuned(t, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), [x, y, programs, n], {})
    torch.testing.assert_close(y, x + 1, rtol=0, atol=0)
    assert int(programs) == triton.cdiv(n, cfg.kwargs["BLOCK"])  # the grid of the config that ran
    return cfg


def test_launch_tuned_goes_through_the_autotuner_once_per_key():
    c16, c32 = triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})
    t, runs = _tuner([c16, c32], fastest=c32)
    assert _launch(t, 50) is c32 and len(runs) == 1
    assert _launch(t, 50) is c32 and len(runs) == 1  # same key: launched directly
    assert t.best_config is c32
    assert _launch(t, 51) is c32 and len(runs) == 2  # another value of the key argument n
    assert _launch(t, 51, torch.float16) is c32 and len(runs) == 3  # another dtype
    assert _launch(t, 51, torch.float16) is c32 and len(runs) == 3
    assert _launch(t, 50) is c32 and len(runs) == 3


def test_launch_tuned_leaves_pre_hooks_and_single_configs_to_the_autotuner():
    hooked = []
    c16 = triton.Config({"BLOCK": 16}, pre_hook=lambda nargs: hooked.append(nargs["n"]))
    t, runs = _tuner([c16, triton.Config({"BLOCK": 32})], fastest=c16)
    for _ in range(3):
        assert _launch(t, 40) is c16
    assert len(runs) == 3 and hooked.count(40) >= 3  # the hook before every launch
    one, runs1 = _tuner([triton.Config({"BLOCK": 64})], fastest=None)
    for _ in range(2):
        assert _launch(one, 40).kwargs["BLOCK"] == 64
    assert len(runs1) == 2


def test_launch_tuned_with_prepare_remembers_hooked_configs():
    """With ``prepare`` (doing what the hooks do: the forward's TMA tiles set their descriptors'
    block shapes), a pick whose config has a pre_hook is remembered too: later launches of its
    key go direct, with ``prepare`` called before each."""
    hooked, prepared = [], []
    c16 = triton.Config({"BLOCK": 16}, pre_hook=lambda nargs: hooked.append(nargs["n"]))
    t, runs = _tuner([c16, triton.Config({"BLOCK": 32})], fastest=c16)

    def launch(n):
        x, y = torch.randn(n), torch.full((n,), float("nan"))
        programs = torch.zeros(1, dtype=torch.int32)
        cfg = _tiles.launch_tuned(t, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), [x, y, programs, n], {},
                                  prepare=prepared.append)
        torch.testing.assert_close(y, x + 1, rtol=0, atol=0)
        return cfg

    assert launch(40) is c16 and len(runs) == 1 and prepared == []  # tuned: the autotuner ran the hook
    ran_hook = len(hooked)
    for _ in range(2):
        assert launch(40) is c16
    assert len(runs) == 1 and prepared == [c16, c16] and len(hooked) == ran_hook


def test_attention_launches_directly_once_tuned(monkeypatch):
    """Forward and backward through ``_launch``'s autotuned branch (forced on this CPU, real
    autotuners over the attention kernels with two interpreter configs each): the second call
    of a shape runs no ``Autotuner.run`` and both calls match the reference; a new length
    bucket goes through the autotuners again."""
    tk = pytest.importorskip("llm2vec_fast.kernels.triton.attention")

    runs = []

    def tuned(kind, head_dim, fp32, dropout, chip, tma=False):
        c = tk.heuristic_config(kind, head_dim, fp32, 64, False, dropout, chip)
        other = triton.Config(dict(c.kwargs), num_warps=c.num_warps * 2, num_stages=c.num_stages)
        t = triton.autotune(configs=[c, other], key=tk._autotune_key(kind))(tk._KERNELS[kind])
        t._bench = lambda *a, config, **k: 1.0 if config is other else 2.0
        real_run = t.run
        t.run = lambda *a, **k: (runs.append(kind), real_run(*a, **k))[1]
        return t

    tuned = functools.cache(tuned)
    launch = tk._launch
    monkeypatch.setattr(tk, "_tuned", tuned)
    monkeypatch.setattr(tk, "_launch", lambda *a, **kw: launch(*a[:-1], True, **kw))  # on_cuda
    monkeypatch.setattr(tk, "chip_of", lambda device: 90)
    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "1")
    monkeypatch.setenv("LLM2VEC_FAST_ATTN_BWD", "separate")
    monkeypatch.setattr(tk, "_POISON_OUTPUTS", True)

    from llm2vec_fast.ops.attention import flash_attn_noncausal

    for S, expect_runs in ((40, 3), (40, 0), (37, 0), (100, 3)):
        g = torch.Generator().manual_seed(S)
        q, k, v = (torch.randn(2, S, 4, 32, generator=g).requires_grad_() for _ in range(3))
        do = torch.randn(2, S, 4, 32, generator=g)
        before = len(runs)
        out = tk.flash_attn_padded_triton(q, k, v, None, 32 ** -0.5, 0.0)
        grads = torch.autograd.grad(out, (q, k, v), do)
        assert len(runs) - before == expect_runs, (S, runs)
        for kind in ("fwd", "dq", "dkdv"):  # the config the fixed timings prefer ran, tuned or direct
            assert tk.LAST_TILES[kind] == tk.tile_name(tuned(kind, 32, True, False, 90).configs[1])
        q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
        want = flash_attn_noncausal(q2, k2, v2, softmax_scale=32 ** -0.5, backend="torch")
        want_grads = torch.autograd.grad(want, (q2, k2, v2), do.double())
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)

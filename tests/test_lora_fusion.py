"""patch_model(fuse_lora=True): memory-lean LoRA projections, gated MLPs and RMSNorms.

Oracles: the same model without fusion (peft's modules, transformers' norms) in fp64, with
the fp32 unfused run setting the error budget (STYLE.md); for dropout, explicit formulas
built from the very masks the fused code draws (``dropout_keep`` with the replayed seeds).
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import assert_close_rule
from llm2vec_fast import patch_model, unpatch_model
from llm2vec_fast.hf import lora as fl
from tiny_models import SUPPORTED, VOCAB, tiny_model

peft = pytest.importorskip("peft")

TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(model_type, *, fuse, dropout=0.0, dtype=torch.float64, order="patch-first", width=None,
                **lora_kw):
    extra = {} if width is None else {"intermediate_size": width}
    model = tiny_model(model_type, causal_lm=True, dtype=dtype, **extra)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                          target_modules=TARGETS.get(model_type, DEFAULT_TARGETS), **lora_kw)
    if order == "patch-first":
        patch_model(model, mntp=True, fuse_lora=fuse)
        model = peft.get_peft_model(model, cfg)
    else:
        model = peft.get_peft_model(model, cfg)
        patch_model(model, mntp=True, fuse_lora=fuse)
    g = torch.Generator().manual_seed(7)
    for n, p in model.named_parameters():
        if "lora_A" in n or "lora_B" in n:  # the same values in every dtype; B not zero (peft's
            with torch.no_grad():           # start), so every LoRA gradient is non-trivial
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.2)
    model.train()
    return model


def _batch(B=3, T=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    labels = torch.where(torch.rand(B, T, generator=g) < 0.4, ids, torch.full_like(ids, -100))
    labels[0, 2] = ids[0, 2]
    return ids, mask, labels


def _loss_and_grads(model, batch):
    ids, mask, labels = batch
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, out.loss.grad_fn


def _graph_names(fn) -> set[str]:
    seen, stack, names = set(), [fn], set()
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        names.add(type(n).__name__)
        try:
            stack.extend(f for f, _ in n.next_functions)
        except RuntimeError:
            # torch 2.11 on CUDA (H200 run): a custom Function's node reached from a released
            # graph refuses next_functions ("legacy access pattern"); it ends the walk there.
            names.add(type(n).__name__ + "<unwalked>")
    return names


FUSED_FNS = ("_LoraLinearFn", "_GatedMLPFn", "_RMSNormFn")


def _count_fused_calls(monkeypatch) -> dict[str, int]:
    """Spy on the fused autograd functions' forwards: name -> calls (a graph-free check)."""
    calls = dict.fromkeys(FUSED_FNS, 0)
    for name in FUSED_FNS:
        fn = getattr(fl, name)
        fwd = fn.forward

        def spy(ctx, *args, _fwd=fwd, _name=name, **kw):
            calls[_name] += 1
            return _fwd(ctx, *args, **kw)

        monkeypatch.setattr(fn, "forward", staticmethod(spy))
    return calls


def _fused_nodes(names):
    return {n for n in names if n.startswith(("_LoraLinearFn", "_GatedMLPFn", "_RMSNormFn"))}


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_fused_matches_peft(model_type):
    """Loss and every LoRA gradient against peft's own path (fp64 oracle, fp32 budget)."""
    batch = _batch()
    order = "peft-first" if model_type in ("llama", "gemma") else "patch-first"
    oracle_loss, oracle_g, _ = _loss_and_grads(_lora_model(model_type, fuse=False, order=order), batch)
    native_loss, native_g, _ = _loss_and_grads(
        _lora_model(model_type, fuse=False, dtype=torch.float32, order=order), batch)
    fused = _lora_model(model_type, fuse=True, dtype=torch.float32, order=order)
    loss, g, fn = _loss_and_grads(fused, batch)
    names = _graph_names(fn)
    assert "_LoraLinearFnBackward" in names or "_GatedMLPFnBackward" in names, "fast path did not run"
    assert "_RMSNormFnBackward" in names
    if model_type != "phi3":  # phi3's fused gate_up_proj MLP runs through the per-projection path
        assert "_GatedMLPFnBackward" in names
    assert_close_rule(loss, oracle_loss.float(), native_loss, name="loss")
    assert set(g) == set(oracle_g) and len(g) > 0
    for n in oracle_g:
        assert_close_rule(g[n], oracle_g[n].float(), native_g[n], factor=3.0, name=n)


def test_fused_matches_in_both_patch_orders():
    batch = _batch(seed=3)
    a = _loss_and_grads(_lora_model("llama", fuse=True, dtype=torch.float32, order="patch-first"), batch)
    b = _loss_and_grads(_lora_model("llama", fuse=True, dtype=torch.float32, order="peft-first"), batch)
    assert torch.equal(a[0], b[0])
    for n in a[1]:
        assert torch.equal(a[1][n], b[1][n]), n


def _rand(*shape, g, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("p", [0.1, 0.3])  # sparse (dropped positions) and dense masks on the CPU
def test_lora_linear_dropout_equals_explicit_formula(p):
    """Forward and the grads of x, A and B against the formula with the mask of the seed
    (fp64 throughout: this checks the math and the mask replay, not rounding)."""
    g = torch.Generator().manual_seed(11)
    N, cin, cout, r, s, seed = 37, 24, 40, 4, 1.7, 12345
    x = _rand(2, N, cin, g=g).requires_grad_()
    W, b = _rand(cout, cin, g=g), _rand(cout, g=g)
    A, B = _rand(r, cin, g=g).requires_grad_(), _rand(cout, r, g=g).requires_grad_()
    y = fl._LoraLinearFn.apply(x, W, b, A, B, s, p, seed)
    dy = _rand(*y.shape, g=g)
    y.backward(dy)
    got = (y.detach(), x.grad, A.grad, B.grad)
    # The reference, in fp64 with the same mask (a fresh tensor, not the scratch buffer).
    keep = fl.dropout_keep((2 * N, cin), p, seed).view(2, N, cin)
    assert 0 < int((~keep).sum()) < keep.numel()
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = x64 @ W.double().t() + b.double() + ((x64 * keep / (1 - p)) @ A64.t()) @ B64.t() * s
    y64.backward(dy.double())
    want = (y64.detach(), x64.grad, A64.grad, B64.grad)
    for name, a, w in zip(("y", "dx", "dA", "dB"), got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind,p", [("silu", 0.1), ("gelu_tanh", 0.1), ("silu", 0.4)])
@pytest.mark.parametrize("lora_on", [(True, True, True), (True, False, True), (False, False, True)])
def test_gated_mlp_dropout_equals_explicit_formula(kind, p, lora_on):
    g = torch.Generator().manual_seed(5)
    N, C, I, r = 29, 16, 40, 4
    x = _rand(N, C, g=g).requires_grad_()
    shapes = [(I, C), (I, C), (C, I)]
    proj, cfg = [], []
    for (o, i), on in zip(shapes, lora_on):
        W = _rand(o, i, g=g)
        A = _rand(r, i, g=g).requires_grad_() if on else None
        B = _rand(o, r, g=g).requires_grad_() if on else None
        proj.append((W, None, A, B))
        cfg.append((0.5 + len(cfg), p))
    torch.manual_seed(99)
    y = fl._GatedMLPFn.apply(x, kind, tuple(cfg), None, *[t for pr in proj for t in pr])
    dy = _rand(*y.shape, g=g)
    y.backward(dy)
    torch.manual_seed(99)  # replay the seeds the forward drew (one per LoRA'd projection)
    seeds = [fl.new_seed() if on else None for on in lora_on]

    act = (lambda t: torch.nn.functional.silu(t)) if kind == "silu" else (
        lambda t: torch.nn.functional.gelu(t, approximate="tanh"))
    x64 = x.detach().double().requires_grad_()
    leaves = []

    def lin(inp, i):
        W, _, A, B = proj[i]
        out = inp @ W.double().t()
        if A is None:
            return out
        A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
        leaves.extend([(A, A64), (B, B64)])
        keep = fl.dropout_keep(inp.shape, p, seeds[i])
        return out + ((inp * keep / (1 - p)) @ A64.t()) @ B64.t() * cfg[i][0]

    y64 = lin(act(lin(x64, 0)) * lin(x64, 1), 2)
    y64.backward(dy.double())
    torch.testing.assert_close(y.detach().double(), y64.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-10, atol=1e-10)
    for t32, t64 in leaves:
        torch.testing.assert_close(t32.grad.double(), t64.grad, rtol=1e-10, atol=1e-10)


def test_norm_output_is_recomputed_not_saved():
    """A projection fed by the fused RMSNorm keeps the norm's input (kept by the norm anyway)
    instead of its output and recomputes it: same gradients, less saved, and an output
    changed in place after the norm is saved as it is (the recompute would be wrong)."""
    g = torch.Generator().manual_seed(3)
    h = _rand(5, 7, 32, g=g, dtype=torch.float32).requires_grad_()
    wn = _rand(32, g=g, dtype=torch.float32)
    W, A, B = (_rand(*sh, g=g, dtype=torch.float32) for sh in ((48, 32), (4, 32), (48, 4)))
    A.requires_grad_()
    dy = _rand(5, 7, 48, g=g, dtype=torch.float32)

    def run(linked: bool, bump: bool = False):
        h.grad = A.grad = None
        x = fl._RMSNormFn.apply(h, wn, 1e-6, False)
        if bump:
            x = x * 1.0  # a new tensor: not the norm's output any more
        src = fl._norm_source(x)
        assert (src is not None) == (not bump)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fl._LoraLinearFn.apply(x, W, None, A, B, 2.0, 0.1, 77, src if linked else None)
        y.backward(dy)
        ptrs = {t.untyped_storage().data_ptr() for t in saved}
        return h.grad.clone(), A.grad.clone(), x.untyped_storage().data_ptr() in ptrs

    h_l, a_l, x_kept_l = run(True)
    h_u, a_u, x_kept_u = run(False)
    assert torch.equal(h_l, h_u) and torch.equal(a_l, a_u)
    assert x_kept_u and not x_kept_l
    *_, x_kept_b = run(True, bump=True)
    assert x_kept_b
    x = fl._RMSNormFn.apply(h, wn, 1e-6, False)
    x.mul_(2.0)  # in place on the norm's output: its history is rebased, no longer linked
    assert fl._norm_source(x) is None


def test_keep_mask_statistics_and_determinism():
    """Even and odd elements use the two halves of one random int32: each half must keep
    1 - p of its elements on its own, and neighbours must be independent."""
    n = 2_000_001  # odd: the last int32 decides one element
    for p in (0.05, 0.3, 0.9):
        m = fl.keep_mask((n,), p, 42, "cpu", role=None)
        assert m.shape == (n,) and m.dtype == torch.bool
        for part in (m[0::2], m[1::2]):
            k = part.numel()
            sigma = (p * (1 - p) / k) ** 0.5
            assert abs(float(part.float().mean()) - (1 - p)) < 5 * sigma, p
        both = (m[0:-1:2] & m[1::2]).float().mean()  # P(keep, keep) = (1 - p)^2 if independent
        assert abs(float(both) - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / (n // 2)) ** 0.5
    assert bool(fl.keep_mask((1000,), 0.0, 3, "cpu", role=None).all())
    a = fl.keep_mask((10, 100), 0.5, 1, "cpu", role=None)
    assert torch.equal(a, fl.keep_mask((10, 100), 0.5, 1, "cpu", role=None))
    assert torch.equal(a, fl.keep_mask((10, 100), 0.5, 1, "cpu"))  # scratch buffer, same values
    assert not torch.equal(a, fl.keep_mask((10, 100), 0.5, 2, "cpu", role=None))


def test_dropped_positions_are_an_iid_bernoulli_mask():
    """Geometric gaps between drops: the drop rate, independence of neighbours, the edges."""
    n = 1_000_003
    for p in (0.003, 0.05, 0.25):
        pos = fl.dropped_positions(n, p, 9)
        assert pos.dtype == torch.int64 and bool((pos[1:] > pos[:-1]).all())
        assert int(pos[0]) >= 0 and int(pos[-1]) < n
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(pos.numel() / n - p) < 5 * sigma, p
        keep = fl.dropout_keep((n,), p, 9)
        assert int((~keep).sum()) == pos.numel()
        both = float((~keep[:-1] & ~keep[1:]).float().mean())  # P(drop, drop) = p^2
        assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5, p
        # position classes mod 7 (a row of length 7) are dropped alike: no periodic bias
        counts = torch.bincount(pos % 7, minlength=7).float()
        assert float((counts - counts.mean()).abs().max()) < 5 * float(counts.mean()) ** 0.5
    assert torch.equal(fl.dropped_positions(5000, 0.05, 1), fl.dropped_positions(5000, 0.05, 1))
    assert not torch.equal(fl.dropped_positions(5000, 0.05, 1), fl.dropped_positions(5000, 0.05, 2))
    for n in (1, 2, 17):
        assert bool((fl.dropped_positions(n, 0.2, 3) < n).all())


def test_dropout_masks_replay_under_gradient_checkpointing(monkeypatch):
    """Checkpointing re-runs each layer's forward: the replayed RNG gives the same seeds, so
    the loss and gradients equal those of the same step without checkpointing; and it re-runs
    it once (looking up a norm's output in the forward must not trigger the recompute)."""
    batch = _batch(seed=4)
    runs, calls = [], []
    fwd = fl._RMSNormFn.forward

    def counted(ctx, *a):
        calls[-1] += 1
        return fwd(ctx, *a)

    monkeypatch.setattr(fl._RMSNormFn, "forward", staticmethod(counted))
    for ckpt in (False, True):
        model = _lora_model("llama", fuse=True, dropout=0.2, dtype=torch.float32)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(2024)
        calls.append(0)
        runs.append(_loss_and_grads(model, batch))
    # 2 layers: without checkpointing 4 fused norms run (layer 0's input norm gets no grad and
    # runs unfused); checkpointing makes the embeddings' output require grad (5 fused norms)
    # and re-runs the 4 inside the layers once in the backward.
    assert calls == [4, 9], calls
    (l0, g0, _), (l1, g1, _) = runs
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)
    # ...and dropout is on: another seed gives another loss.
    model = _lora_model("llama", fuse=True, dropout=0.2, dtype=torch.float32)
    torch.manual_seed(7)
    assert float((_loss_and_grads(model, batch)[0] - l0).abs()) > 1e-6


def _saved_bytes(model, batch) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for the backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids, mask, labels = batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return sum(seen.values())


def test_fused_layers_save_less_than_half():
    """The point of the fusion: with LoRA dropout on every projection (the recipe), what the
    backward keeps shrinks below half of what peft's modules and transformers' layers keep
    (an MLP three times wider than the model, like real checkpoints)."""
    batch = _batch(B=4, T=32, seed=2)
    plain = _saved_bytes(_lora_model("llama", fuse=False, dropout=0.05, dtype=torch.float32, width=192), batch)
    fused = _saved_bytes(_lora_model("llama", fuse=True, dropout=0.05, dtype=torch.float32, width=192), batch)
    assert fused < 0.5 * plain, (fused, plain)


def test_fallbacks_run_peft_unchanged():
    """DoRA, autocast, no grad and disabled adapters take peft's own forward (exact results)."""
    batch = _batch(seed=6)
    ids, mask, labels = batch
    # DoRA: not vanilla LoRA, so no _LoraLinearFn / _GatedMLPFn (the norms still fuse).
    dora_f = _lora_model("llama", fuse=True, dtype=torch.float32, use_dora=True)
    dora_p = _lora_model("llama", fuse=False, dtype=torch.float32, use_dora=True)
    lf, gf, fn = _loss_and_grads(dora_f, batch)
    lp, gp, _ = _loss_and_grads(dora_p, batch)
    assert not {n for n in _graph_names(fn) if n.startswith(("_LoraLinearFn", "_GatedMLPFn"))}
    torch.testing.assert_close(lf, lp, rtol=1e-6, atol=1e-6)
    model = _lora_model("llama", fuse=True, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert not _fused_nodes(_graph_names(out.loss.grad_fn))
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref = _lora_model("llama", fuse=False, dtype=torch.float32)
    with torch.no_grad():
        b = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.equal(a, b)
    with model.disable_adapter():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert not {n for n in _graph_names(out.loss.grad_fn) if n.startswith(("_LoraLinearFn", "_GatedMLPFn"))}


def _loss_from_embeds(model, batch):
    """Loss with the input embeddings as a leaf that needs grad (so a merged model, whose
    parameters are all frozen, still records a graph)."""
    ids, mask, labels = batch
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    return model(inputs_embeds=emb, attention_mask=mask, labels=labels).loss


def test_merged_adapters_deepcopy_and_unpatch():
    model = _lora_model("llama", fuse=True, dtype=torch.float32)
    batch = _batch(seed=8)
    before = _loss_from_embeds(model, batch)
    assert {"_LoraLinearFnBackward", "_GatedMLPFnBackward"} <= _graph_names(before.grad_fn)
    # A deep copy keeps working on its own modules.
    twin = copy.deepcopy(model)
    again = _loss_from_embeds(twin, batch)
    assert {"_LoraLinearFnBackward", "_GatedMLPFnBackward"} <= _graph_names(again.grad_fn)
    torch.testing.assert_close(again, before, rtol=0, atol=0)
    model.merge_adapter()
    merged = _loss_from_embeds(model, batch)
    assert not {n for n in _graph_names(merged.grad_fn) if n.startswith(("_LoraLinearFn", "_GatedMLPFn"))}
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    unpatch_model(model)
    assert not [m for m in model.modules() if "forward" in m.__dict__]
    assert not _fused_nodes(_graph_names(_loss_from_embeds(model, batch).grad_fn))


def test_bf16_base_with_fp32_adapters():
    """A bf16 model with peft's fp32 adapters: the LoRA branch runs in fp32 as peft's does."""
    batch = _batch(seed=9)
    oracle = _loss_and_grads(_lora_model("llama", fuse=False), batch)
    native = _loss_and_grads(_lora_model("llama", fuse=False, dtype=torch.bfloat16), batch)
    fused_model = _lora_model("llama", fuse=True, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for n, p in fused_model.named_parameters() if "lora_" in n)
    fused = _loss_and_grads(fused_model, batch)
    assert _fused_nodes(_graph_names(fused[2]))
    assert_close_rule(fused[0].float(), oracle[0].float(), native[0].float(), name="loss")
    for n in oracle[1]:
        assert_close_rule(fused[1][n].float(), oracle[1][n].float(), native[1][n].float(), factor=3.0, name=n)


def test_torch_compile_of_a_fused_model_runs_peft_inside_the_graphs():
    """The fused functions write into module-level scratch buffers, which Dynamo cannot trace
    (it crashed compiling the RMSNorm function); inside torch.compile the modules' own
    forwards run, with peft's results."""
    batch = _batch(seed=8)
    fused = _lora_model("llama", fuse=True, dtype=torch.float32)
    plain = _lora_model("llama", fuse=False, dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager")
    lc, gc, _ = _loss_and_grads(compiled, batch)
    gc = {n.removeprefix("_orig_mod."): g for n, g in gc.items()}
    lp, gp, _ = _loss_and_grads(plain, batch)
    torch.testing.assert_close(lc, lp, rtol=1e-5, atol=1e-6)
    assert gc.keys() == gp.keys() and gc
    for n in gp:
        torch.testing.assert_close(gc[n], gp[n], rtol=1e-4, atol=1e-6, msg=n)
    lf, _, fn = _loss_and_grads(fused, batch)  # eager: still fused
    assert _fused_nodes(_graph_names(fn))


def test_fuse_lora_argument_is_checked():
    with pytest.raises(ValueError, match="fuse_lora"):
        patch_model(tiny_model("llama"), fuse_lora="yes")


def test_fuse_lora_auto_is_cpu_only(monkeypatch):
    """The default ("auto") fuses CPU inputs (as True does) and leaves other devices to peft:
    on an H200 the fused, host-bound step was slower (benchmarks/results/e2e.jsonl)."""
    import inspect

    assert inspect.signature(patch_model).parameters["fuse_lora"].default == "auto"
    batch = _batch()
    calls = _count_fused_calls(monkeypatch)
    auto = _loss_and_grads(_lora_model("llama", fuse="auto"), batch)
    assert calls["_LoraLinearFn"] and calls["_GatedMLPFn"] and calls["_RMSNormFn"], calls
    fused = _loss_and_grads(_lora_model("llama", fuse=True), batch)
    torch.testing.assert_close(auto[0], fused[0], rtol=0, atol=0)
    # the device gate itself (a meta tensor stands in for CUDA, which this machine lacks)
    x = torch.empty(4, 8, device="meta")
    assert not fl._fast_ok(x, cpu_only=True)
    assert fl._fast_ok(torch.empty(4, 8), cpu_only=True)
    model = _lora_model("llama", fuse="auto")
    _loss_and_grads(model, batch)  # peft's modules get their forwards at the first forward
    fusion = next(getattr(m, "_llm2vec_fast_fusion") for m in model.modules() if hasattr(m, "_llm2vec_fast_fusion"))
    assert fusion.cpu_only and fusion.installed
    assert all(getattr(m.forward, "func", None) is not None for m in fusion.installed)  # partial(_cpu_only=True)


def test_fused_call_spy(monkeypatch):
    """The spy the GPU test relies on: counts fused forwards, none without fusion."""
    batch = _batch()
    calls = _count_fused_calls(monkeypatch)
    _loss_and_grads(_lora_model("llama", fuse=False), batch)
    assert not any(calls.values()), calls
    _loss_and_grads(_lora_model("llama", fuse=True), batch)
    assert calls["_LoraLinearFn"] and calls["_GatedMLPFn"], calls


@pytest.mark.gpu
def test_fused_matches_peft_on_cuda(monkeypatch):
    """On a GPU the dense-mask dropout and the bf16-base / fp32-adapter path: loss and LoRA
    gradients against peft's (fp64 oracle on the CPU, bf16 peft run on the GPU as the budget)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    batch = _batch(seed=12)
    oracle = _loss_and_grads(_lora_model("llama", fuse=False), batch)
    cuda_batch = tuple(t.cuda() for t in batch)
    native = _loss_and_grads(_lora_model("llama", fuse=False, dtype=torch.bfloat16).cuda(), cuda_batch)
    fused_model = _lora_model("llama", fuse=True, dtype=torch.bfloat16).cuda()
    calls = _count_fused_calls(monkeypatch)
    fused = _loss_and_grads(fused_model, cuda_batch)
    assert calls["_LoraLinearFn"] and calls["_GatedMLPFn"], calls
    assert_close_rule(fused[0].float().cpu(), oracle[0].float(), native[0].float().cpu(), name="loss")
    for n in oracle[1]:
        assert_close_rule(fused[1][n].float().cpu(), oracle[1][n].float(), native[1][n].float().cpu(),
                          factor=3.0, name=n)
    # dropout on the GPU: the dense keep-mask path, statistics and replay under checkpointing
    m = fl.keep_mask((1_000_000,), 0.1, 5, "cuda", role=None)
    assert abs(float(m.float().mean()) - 0.9) < 5 * (0.09 / 1e6) ** 0.5
    runs = []
    for ckpt in (False, True):
        model = _lora_model("llama", fuse=True, dropout=0.2, dtype=torch.float32).cuda()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(99)
        runs.append(_loss_and_grads(model, cuda_batch))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_fuse_lora_auto_leaves_cuda_to_peft(monkeypatch):
    """The default on CUDA inputs: peft's own modules (no fused forward runs), same loss as an
    unfused model; True still fuses there."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    batch = tuple(t.cuda() for t in _batch(seed=3))
    calls = _count_fused_calls(monkeypatch)
    auto = _loss_and_grads(_lora_model("llama", fuse="auto", dtype=torch.float32).cuda(), batch)
    assert not any(calls.values()), calls
    plain = _loss_and_grads(_lora_model("llama", fuse=False, dtype=torch.float32).cuda(), batch)
    torch.testing.assert_close(auto[0], plain[0], rtol=1e-6, atol=1e-6)
    _loss_and_grads(_lora_model("llama", fuse=True, dtype=torch.float32).cuda(), batch)
    assert calls["_LoraLinearFn"] and calls["_GatedMLPFn"], calls


def _embed_rows(model, c):
    """Mean of the last hidden states over the valid tokens: a contrastive-style embedding."""
    h = model(input_ids=c["input_ids"], attention_mask=c["attention_mask"], output_hidden_states=True).hidden_states[-1]
    m = c["attention_mask"][..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def test_gradcache_with_lora_dropout_draws_the_replayed_masks():
    """GradCache's first pass runs without grad and its replay with: the fused functions run in
    both (with a LoRA dropout active), so the replay draws the first pass's masks and the
    gradients are those of the loss it reports (peft's nn.Dropout in the first pass and
    seeded masks in the replay made them up to 4x off)."""
    from llm2vec_fast.training.gradcache import gradcache_step

    ids, mask, _ = _batch(B=4, seed=5)
    feats = {"input_ids": ids, "attention_mask": mask}
    loss_fn = lambda e: (e @ e.t()).logsumexp(-1).mean()  # noqa: E731 - rows interact, as in InfoNCE
    runs = []
    for cached in (False, True):
        model = _lora_model("llama", fuse=True, dropout=0.2)
        torch.manual_seed(99)
        if cached:
            loss = gradcache_step(lambda c: _embed_rows(model, c), feats, loss_fn, 4)
        else:
            loss = loss_fn(_embed_rows(model, feats))
            loss.backward()
        runs.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = runs
    assert l1 == pytest.approx(l0, rel=1e-12) and g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-12, msg=n)


def test_reentrant_checkpointing_with_lora_dropout():
    """Reentrant checkpointing runs each layer first without grad, then again with it: the
    same masks both times, so the step equals the one without checkpointing."""
    batch = _batch(seed=6)
    runs = []
    for ckpt in (False, True):
        model = _lora_model("llama", fuse=True, dropout=0.2)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        torch.manual_seed(2025)
        runs.append(_loss_and_grads(model, batch))
    (l0, g0, f0), (l1, g1, _) = runs
    assert _fused_nodes(_graph_names(f0))
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-12, msg=n)


def test_hooks_on_modules_the_fused_paths_read_are_honoured():
    """The fused MLP reads gate / up / down's weights without calling them, and the LoRA
    function its base layer's: a hook there (user code, accelerate, peft's mixed-adapter
    batches) sends the module to its own forward instead of being skipped."""
    batch = _batch(seed=3)
    out = {}
    for fuse in (True, False):
        model = _lora_model("llama", fuse=fuse)
        base = model.get_base_model()
        base.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: o * 1.5)
        base.model.layers[1].mlp.act_fn.register_forward_hook(lambda m, a, o: o * 0.5)
        fired = []
        base.model.layers[1].self_attn.q_proj.base_layer.register_forward_pre_hook(lambda m, a: fired.append(1))
        out[fuse] = (_loss_and_grads(model, batch)[0], len(fired))
    assert out[True][1] == out[False][1] == 1
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-12, atol=0)


def test_unpatch_also_restores_copies_peft_made():
    """peft's modules_to_save deep-copies a module patch_model had given a fused forward;
    unpatch_model removes the copies' forwards too."""
    model = _lora_model("llama", fuse=True, modules_to_save=["mlp", "post_attention_layernorm"])
    unpatch_model(model)
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]
    assert not _fused_nodes(_graph_names(_loss_and_grads(model, _batch())[2]))


def test_deepcopy_of_an_mntp_patched_model_runs_the_copy():
    """The MNTP forward is a method bound to the model: a deep copy runs (and trains) the
    copy, not the original (it closed over the original model)."""
    model = _lora_model("llama", fuse=False)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_B" in n:
                p.zero_()
    batch = _batch(seed=2)
    l_orig = _loss_and_grads(model, batch)[0]
    model.zero_grad(set_to_none=True)
    l_twin, g_twin, _ = _loss_and_grads(twin, batch)
    assert float((l_twin - l_orig).abs()) > 1e-3
    assert g_twin and all(p.grad is None for p in model.parameters())


def test_unpatching_a_deep_copy_leaves_the_original_fused():
    """The fusion state's weak reference to its model was copied as it was, so the copy's
    unpatch walked the original and removed its fused forwards (still reported patched)."""
    from llm2vec_fast.hf.patch import is_patched

    model = _lora_model("llama", fuse=True, dtype=torch.float32)
    fused = lambda m: [n for n, x in m.named_modules() if "forward" in x.__dict__]  # noqa: E731
    before = fused(model)
    twin = copy.deepcopy(model)
    assert fused(twin) == before and before
    unpatch_model(twin)
    assert not fused(twin) and not is_patched(twin)
    assert fused(model) == before and is_patched(model)
    assert _fused_nodes(_graph_names(_loss_and_grads(model, _batch())[2]))


@pytest.mark.parametrize("fuse", [True, False])
def test_pickling_a_patched_model_is_a_clear_error(fuse):
    """torch.save(model) of a patched model failed on a local closure (the pre-hook) or a weak
    reference; it now says why and what to do; unpatched, the model pickles again."""
    import io

    model = _lora_model("llama", fuse=fuse, dtype=torch.float32)
    with pytest.raises(TypeError, match="cannot be pickled.*save_pretrained"):
        torch.save(model, io.BytesIO())
    unpatch_model(model)
    torch.save(model, io.BytesIO())

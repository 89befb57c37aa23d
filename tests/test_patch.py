"""patch_model / unpatch_model on tiny random models of every supported architecture (CPU, reference backend)."""
from __future__ import annotations

import warnings

import pytest
import torch

from llm2vec_fast.hf import padding as padmod
from llm2vec_fast.hf.patch import SUPPORTED_MODEL_TYPES, is_patched, patch_model, unpatch_model
from tiny_models import SUPPORTED, VOCAB, tiny_config, tiny_model

REL = 1e-9  # float64 bound, relative to the largest absolute hidden value


def batch(lengths, side, S=None):
    """Random ids (B, S) and a padding mask for sequences of ``lengths`` padded on ``side``."""
    S = S or max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), S))
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, S - n:] = 1
        else:
            mask[b, :n] = 1
    return ids, mask


def valid(h, mask, b):
    """Hidden states ``(n, C)`` of row b at its valid positions."""
    return h[b][mask[b].bool()]


def hidden(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state


def bound(*hs):
    return REL * max(float(h.detach().abs().max()) for h in hs)


def test_supported_table_matches_tiny_models():
    assert set(SUPPORTED_MODEL_TYPES) == set(SUPPORTED)


def test_bad_arguments_raise():
    from transformers import AutoConfig, AutoModel

    gpt2 = AutoModel.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="supported model types.*llama"):
        patch_model(gpt2)
    with pytest.raises(ValueError, match="model: expected a transformers"):
        patch_model(torch.nn.Linear(2, 2))
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="backend"):
        patch_model(m, backend="cuda")
    with pytest.raises(ValueError, match="mntp=True"):
        patch_model(m, mntp=True)  # a base model has no LM head
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="flash_attn"):
            patch_model(m, backend="flash_attn")
    assert m.config._attn_implementation == "sdpa"  # nothing half-applied


# --------------------------------------------------------------------------------------
# Bidirectionality: the first token sees the last one after patching, never before.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", SUPPORTED)
@pytest.mark.parametrize("case", ["bs1", "no_padding", "left", "right"])
def test_bidirectional(model_type, case):
    model = tiny_model(model_type)
    lengths = {"bs1": [9], "no_padding": [9, 9], "left": [9, 5, 7], "right": [9, 5, 7]}[case]
    ids, mask = batch(lengths, "right" if case == "right" else "left")
    b = len(lengths) - 1  # the last row: the shortest row of padded batches
    pos = mask[b].nonzero().squeeze(1)
    first, last = int(pos[0]), int(pos[-1])
    ids2 = ids.clone()
    ids2[b, last] = 3 + (ids[b, last] - 3 + 1) % (VOCAB - 3)
    use_mask = None if case == "bs1" else mask

    before = hidden(model, ids, use_mask)[b, first]
    before2 = hidden(model, ids2, use_mask)[b, first]
    assert torch.equal(before, before2), "the unpatched model should be causal"

    patch_model(model)
    after = hidden(model, ids, use_mask)[b, first]
    after2 = hidden(model, ids2, use_mask)[b, first]
    assert float((after - after2).abs().max()) > 1e-4 * float(after.abs().max()), "the first token did not see the last"


# --------------------------------------------------------------------------------------
# Padding invariance, packing, parity with a hand-written bidirectional mask.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_padding_invariance_float64(model_type):
    model = patch_model(tiny_model(model_type, dtype=torch.float64))
    lengths = [11, 4, 8]
    ids, mask_l = batch(lengths, "left")
    mask_r = torch.zeros_like(mask_l)
    ids_r = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask_r[b, :n] = 1
        ids_r[b, :n] = ids[b, -n:]
    h_left = hidden(model, ids, mask_l)
    h_right = hidden(model, ids_r, mask_r)
    for b, n in enumerate(lengths):
        alone = hidden(model, ids[b:b + 1, -n:])[0]
        pair = hidden(model, ids[[b, 0], -11:], mask_l[[b, 0]])  # another batch, other companions
        tol = bound(alone)
        for got in (valid(h_left, mask_l, b), valid(h_right, mask_r, b), valid(pair, mask_l[[b, 0]], 0)):
            assert float((got - alone).abs().max()) <= tol


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_packed_matches_padded_float64(model_type):
    model = patch_model(tiny_model(model_type, dtype=torch.float64))
    lengths = [6, 1, 9, 4]
    ids, mask = batch(lengths, "right")
    h_pad = hidden(model, ids, mask)
    flat = torch.cat([ids[b, :n] for b, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    h_pos = hidden(model, flat, position_ids=pos)[0]
    h_cu = hidden(model, flat, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)[0]
    want = torch.cat([valid(h_pad, mask, b) for b in range(len(lengths))])
    tol = bound(want)
    assert float((h_pos - want).abs().max()) <= tol
    assert float((h_cu - want).abs().max()) <= tol


def _hand_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """Written out by hand: K/V repeated per group, scores, softcap, the additive 4-d mask,
    a softmax in the input dtype (fp64 stays fp64, unlike transformers' eager which runs
    its softmax in fp32), no dropout (the tests run in eval mode)."""
    G = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(G, dim=1)
    v = value.repeat_interleave(G, dim=1)
    s = query @ k.transpose(-1, -2) * scaling
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    p = torch.softmax(s + attention_mask, dim=-1)
    return (p @ v).transpose(1, 2), None


HAND = "llm2vec_fast_test_hand_eager"


def eager_bidirectional(model_type, dtype, ids, mask, grad=False):
    """The stock model with a hand-written attention and a hand-built 4-d padding-only mask.

    A 4-d mask is passed through transformers untouched, so no causal or sliding-window
    pattern is added: every query sees every valid key. Positions start at 0 at each
    sequence's first valid token. Returns (hidden states, model).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(HAND, _hand_attention)
    model = tiny_model(model_type, dtype=dtype)
    model.set_attn_implementation(HAND)
    m = mask.bool()
    add = torch.zeros(m.shape[0], 1, m.shape[1], m.shape[1], dtype=dtype)
    add = add.masked_fill(~m[:, None, None, :], torch.finfo(dtype).min)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.set_grad_enabled(grad):
        h = model(input_ids=ids, attention_mask=add, position_ids=pos).last_hidden_state
    return h, model


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_parity_with_eager_float64_with_gradients(model_type):
    ids, mask = batch([10, 6, 3], "left")
    want, ref_model = eager_bidirectional(model_type, torch.float64, ids, mask, grad=True)
    model = patch_model(tiny_model(model_type, dtype=torch.float64))
    got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.bool()
    tol = bound(want[m])
    assert float((got[m] - want[m]).abs().max()) <= tol
    # Every parameter's gradient, through a loss on valid positions only.
    w = torch.randn_like(want)
    (want[m] * w[m]).sum().backward()
    (got[m] * w[m]).sum().backward()
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        g_ref = ref_params[name].grad
        assert p.grad is not None, name
        assert float((p.grad - g_ref).abs().max()) <= REL * max(float(g_ref.abs().max()), 1e-30) * 10, name


@pytest.mark.parametrize("model_type", SUPPORTED)
@pytest.mark.parametrize("side", ["left", "right"])
def test_parity_with_eager_float32(model_type, side):
    """fp32: the tolerance is the eager fp32 model's own error against its fp64 run (STYLE.md)."""
    ids, mask = batch([10, 6, 3], side)
    oracle, _ = eager_bidirectional(model_type, torch.float64, ids, mask)
    ref32, _ = eager_bidirectional(model_type, torch.float32, ids, mask)
    model = patch_model(tiny_model(model_type, dtype=torch.float32))
    got = hidden(model, ids, mask)
    m = mask.bool()
    err = float((got[m].double() - oracle[m]).abs().max())
    budget = 2 * float((ref32[m].double() - oracle[m]).abs().max()) + 1e-6 * float(oracle[m].abs().max())
    assert err <= budget, f"{err:.3e} > {budget:.3e}"


# --------------------------------------------------------------------------------------
# Undo exactly; patch twice; the padding structure once per forward.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_unpatch_is_exact_and_patch_twice_is_noop(model_type):
    model = tiny_model(model_type, causal_lm=True)
    ids, mask = batch([8, 5], "left")
    impl = model.config._attn_implementation
    flags = {n: m.is_causal for n, m in model.named_modules() if hasattr(m, "is_causal")}
    fwd = model.forward
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    assert not is_patched(model)
    patch_model(model, mntp=True)
    assert is_patched(model)
    state = model._llm2vec_fast_patch
    patch_model(model, mntp=True)
    assert model._llm2vec_fast_patch is state  # the second call did nothing
    with torch.no_grad():
        during = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(during, before)
    unpatch_model(model)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(after, before)
    assert model.config._attn_implementation == impl
    assert "is_causal" not in model.config.__dict__
    assert {n: m.is_causal for n, m in model.named_modules() if hasattr(m, "is_causal")} == flags
    assert not model.model._forward_pre_hooks
    assert "forward" not in model.__dict__ and model.forward == fwd
    assert not hasattr(model, "_llm2vec_fast_patch")
    assert not any(hasattr(m, "llm2vec_fast_backend") for m in model.modules())
    unpatch_model(model)  # unpatching an unpatched model is harmless


def test_repatch_with_other_arguments():
    model = tiny_model("llama", causal_lm=True)
    patch_model(model, mntp=True)
    patch_model(model, backend="torch")
    assert "forward" not in model.__dict__  # mntp dropped
    assert model.model.layers[0].self_attn.llm2vec_fast_backend == "torch"
    unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"


def test_padding_structure_built_once_per_forward(monkeypatch):
    """Gemma2 has full and sliding layers (two mask calls); the structure is still built once."""
    model = patch_model(tiny_model("gemma2", num_hidden_layers=4, layer_types=None))
    built = []
    real = padmod.PaddingInfo.__init__

    def counting(self, mask):
        built.append(mask)
        real(self, mask)

    monkeypatch.setattr(padmod.PaddingInfo, "__init__", counting)
    ids, mask = batch([7, 3], "left")
    hidden(model, ids, mask)
    assert len(built) == 1
    hidden(model, ids, mask)  # a new forward (new bool mask object) builds it again, once
    assert len(built) == 2


@pytest.mark.parametrize("rows,holes", [
    ([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], False),   # right padding
    ([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], False),   # left padding
    ([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], False),   # both sides, and a row with no valid token
    ([[1, 1, 1, 1, 1], [1, 0, 0, 0, 1]], True),    # a hole between valid tokens
    ([[0, 1, 0, 1, 0], [1, 1, 1, 1, 1]], True),
])
def test_padding_info_holes(rows, holes):
    """has_holes: some row's valid tokens are not one run. A hole-free mask is noted for the
    Triton forward (this object, this version); one with holes is not."""
    from llm2vec_fast import _tensor_cache as tc

    mask = torch.tensor(rows, dtype=torch.bool)
    tc._HOLE_FREE[0] = None
    info = padmod.PaddingInfo(mask)
    assert info.has_holes == holes and info.has_padding == (not mask.all())
    assert tc.is_hole_free(mask) == (not holes) and not tc.is_hole_free(mask.clone())
    if not holes:
        mask[0, 0] = not mask[0, 0]  # an in-place change forgets the fact
        assert not tc.is_hole_free(mask)


def test_padding_info_roundtrip():
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    info = padmod.PaddingInfo(mask)
    assert info.has_padding and info.total == 9 and info.max_seqlen == 5
    assert info.cu_seqlens.dtype == torch.int32 and info.cu_seqlens.tolist() == [0, 3, 8, 9]
    x = torch.randn(3, 5, 2, 4)
    packed = info.unpad(x.transpose(1, 2).transpose(1, 2))
    assert packed.shape == (9, 2, 4)
    back = info.pad(packed)
    assert torch.equal(back[mask], x[mask]) and not back[~mask].any()
    assert not padmod.PaddingInfo(torch.ones(2, 3, dtype=torch.bool)).has_padding
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    cu, mx = padmod.packed_from_position_ids(pos, 1)
    assert cu.tolist() == [0, 3, 5, 6] and mx == 3
    assert padmod.packed_from_position_ids(torch.arange(6)[None].expand(2, -1).clone(), 2) is None


def test_positions_derived_from_mask_only_when_absent():
    """Derived positions equal explicit mask-based ones; explicit default positions are honoured.

    RoPE is relative, so a constant shift changes the states only through the rounding of
    the fp32 rotary tables (the 1.2e-4 seen on SmolLM2): different, but only slightly.
    """
    model = patch_model(tiny_model("llama", dtype=torch.float64))
    ids, mask = batch([9, 4], "left")
    derived = hidden(model, ids, mask)
    explicit = hidden(model, ids, mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    default = hidden(model, ids, mask, position_ids=torch.arange(9)[None].expand(2, -1))
    m = mask.bool()
    assert torch.equal(derived[m], explicit[m])
    assert not torch.equal(default[1][m[1]], derived[1][m[1]])


# --------------------------------------------------------------------------------------
# Training: dropout, LoRA, MNTP.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_attention_dropout_in_training(model_type):
    model = patch_model(tiny_model(model_type, attention_dropout=0.3))
    ids, mask = batch([8, 5], "right")
    m = mask.bool()
    model.train()
    a, b = hidden(model, ids, mask), hidden(model, ids, mask)
    assert float((a[m] - b[m]).abs().max()) > 1e-4  # dropout is active: SimCSE's two views differ
    model.eval()
    c, d = hidden(model, ids, mask), hidden(model, ids, mask)
    assert torch.equal(c, d)


def test_lora_patch_and_train_one_step():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", causal_lm=True)
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    )
    patch_model(lora, mntp=True)
    assert base.config._attn_implementation == "llm2vec_fast"
    ids, mask = batch([9, 6], "right")
    labels = torch.where(torch.rand(ids.shape) < 0.4, ids, torch.full_like(ids, -100))
    labels[:, 1] = ids[:, 1]
    labels[mask == 0] = -100
    lora.train()
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    out = lora(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in lora.named_parameters():
        if "lora_" in n:
            assert p.grad is not None, n
            if "lora_B" in n:  # lora_B starts at 0, so only lora_B gets a nonzero first gradient
                assert float(p.grad.abs().max()) > 0, n
        else:
            assert p.grad is None, n
    opt.step()
    changed = {n for n, p in lora.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    unpatch_model(lora)
    assert base.config._attn_implementation == "sdpa"


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every tensor created by an op (to prove no (B, T, V) logits exist)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_mntp_loss_matches_full_logits(model_type):
    import torch.nn.functional as F

    ids, mask = batch([12, 7, 10], "right")
    labels = torch.where(torch.rand(ids.shape) < 0.25, ids, torch.full_like(ids, -100))
    labels[:, 3] = ids[:, 3]
    labels[mask == 0] = -100

    full = patch_model(tiny_model(model_type, causal_lm=True, dtype=torch.float64))
    out_full = full(input_ids=ids, attention_mask=mask)
    logits = out_full.logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    want.backward()

    fused = patch_model(tiny_model(model_type, causal_lm=True, dtype=torch.float64), mntp=True)
    fused.train()  # the training path (no dropout configured, so it is deterministic)
    with _LargestTensor() as rec:
        out = fused(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    B, T = ids.shape
    C = fused.config.hidden_size
    big = [s for s in rec.shapes
           if len(s) >= 2 and s[-1] == VOCAB and s[:-1] != (C,) and torch.Size(s[:-1]).numel() >= B * (T - 1)]
    assert not big, f"full-vocabulary logits were materialised: {big}"
    assert abs(float(out.loss) - float(want)) <= 1e-6 * abs(float(want))
    out.loss.backward()
    ref_params = dict(full.named_parameters())
    for name, p in fused.named_parameters():
        g = ref_params[name].grad
        assert float((p.grad - g).abs().max()) <= 1e-6 * float(g.abs().max()) + 1e-12, name

    # num_items_in_batch (gradient accumulation): sum / count, like transformers' loss.
    n = int((labels[:, 1:] != -100).sum())
    out2 = fused(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(2 * n))
    assert abs(float(out2.loss) - float(want) / 2) <= 1e-6 * abs(float(want))
    # Without labels the original forward runs (full logits, as before).
    with torch.no_grad():
        assert fused(input_ids=ids, attention_mask=mask).logits.shape == (B, T, VOCAB)


# --------------------------------------------------------------------------------------
# The Triton backend (interpreted on the CPU here; issue 4).
# --------------------------------------------------------------------------------------


def _triton_attention_or_skip():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    try:
        from llm2vec_fast.kernels.triton import attention  # noqa: F401
    except ImportError as e:
        pytest.skip(f"llm2vec_fast.kernels.triton.attention is not available yet ({e})")


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["left", "right", "packed"])
def test_triton_backend_matches_reference(layout, monkeypatch):
    """backend="triton" vs the reference backend on a tiny fp32 Llama: hidden states and every
    parameter gradient, judged by STYLE.md's rule against an fp64 oracle."""
    _triton_attention_or_skip()
    from llm2vec_fast.kernels.triton import attention as tk

    calls = []
    for name in ("flash_attn_padded_triton", "flash_attn_varlen_triton"):
        real = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths = [13, 6, 9]
    ids, mask = batch(lengths, "right" if layout == "packed" else layout)
    kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device))
    if layout == "packed":
        kw = dict(input_ids=torch.cat([ids[b, :n] for b, n in enumerate(lengths)])[None].to(device),
                  position_ids=torch.cat([torch.arange(n) for n in lengths])[None].to(device))
    sel = mask.bool().to(device) if layout != "packed" else slice(None)

    def run(backend, dtype):
        # head_dim 32: the smallest head dim the kernels support.
        model = patch_model(tiny_model("llama", head_dim=32, dtype=dtype).to(device), backend=backend)
        h = model(**kw).last_hidden_state
        h = h[sel] if layout != "packed" else h[0]
        w = torch.randn(h.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)
        (h * w.to(dtype)).sum().backward()
        return h.detach(), {n: p.grad for n, p in model.named_parameters()}

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback to the reference
        got, g_got = run("triton", torch.float32)
    want_kernel = "flash_attn_varlen_triton" if layout == "packed" else "flash_attn_padded_triton"
    assert calls == [want_kernel] * 2, calls  # one launch per layer, the kernel itself ran
    want, g_want = run("torch", torch.float32)
    oracle, g_oracle = run("torch", torch.float64)
    scale = float(oracle.abs().max())
    err = float((got.double() - oracle).abs().max())
    budget = 2 * float((want.double() - oracle).abs().max()) + 1e-6 * scale
    assert err <= budget, f"hidden: {err:.3e} > {budget:.3e}"
    for n, g in g_oracle.items():
        err = float((g_got[n].double() - g).abs().max())
        budget = 3 * float((g_want[n].double() - g).abs().max()) + 1e-6 * float(g.abs().max())
        assert err <= budget, f"{n}: {err:.3e} > {budget:.3e}"


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    """The padding structure travels through checkpointed layers (recomputed in backward)."""
    ids, mask = batch([9, 4, 7], "left")
    grads = []
    for ckpt in (False, True):
        model = patch_model(tiny_model("qwen2", dtype=torch.float64))
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        w = torch.randn(h.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        (h * w * mask[..., None]).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        assert float((grads[1][n] - g).abs().max()) <= REL * float(g.abs().max()), n


def test_unpadded_varlen_layout_matches_padded(monkeypatch):
    """The flash_attn backend's layout (gather valid tokens, varlen, scatter), run here with the
    reference varlen attention, equals the padded layout."""
    import llm2vec_fast.hf.attention as hfa
    import llm2vec_fast.ops.attention as ops_attn

    ids, mask = batch([10, 3, 7], "left")
    model = patch_model(tiny_model("gemma2", dtype=torch.float64))
    want = hidden(model, ids, mask)
    real = ops_attn.flash_attn_varlen_noncausal
    calls = []

    def varlen_on_reference(*args, **kw):
        calls.append(args[0].shape)
        args = list(args)
        args[9] = "torch"  # the backend argument
        return real(*args, **kw)

    monkeypatch.setattr(hfa, "resolve_backend", lambda *a, **k: "flash_attn")
    monkeypatch.setattr(ops_attn, "flash_attn_varlen_noncausal", varlen_on_reference)
    got = hidden(model, ids, mask)
    assert calls and all(s[0] == 20 for s in calls)  # 10 + 3 + 7 valid tokens, packed
    m = mask.bool()
    assert float((got[m] - want[m]).abs().max()) <= bound(want[m])


@pytest.mark.interpreter
def test_triton_backend_runs_dropout_in_the_kernels(monkeypatch):
    """Training with attention dropout on backend="triton": the kernels drop (no fallback,
    no warning), the two SimCSE views differ, gradients reach every layer, eval is exact."""
    _triton_attention_or_skip()
    import warnings

    import llm2vec_fast.ops._dispatch as dispatch
    from llm2vec_fast.kernels.triton import attention as tk

    monkeypatch.setattr(dispatch, "_WARNED", set())
    seen = []
    real_fwd = tk.attention_forward

    def spy(*args, **kw):
        seen.append(args[10] if len(args) > 10 else kw.get("dropout_p", 0.0))
        return real_fwd(*args, **kw)

    monkeypatch.setattr(tk, "attention_forward", spy)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = patch_model(tiny_model("llama", head_dim=32, attention_dropout=0.3).to(device), backend="triton")
    model.train()
    ids, mask = batch([6, 4], "right")
    ids, mask = ids.to(device), mask.to(device)
    m = mask.bool()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = hidden(model, ids, mask)
    assert seen and all(p == 0.3 for p in seen)  # every layer ran the Triton forward with dropout
    assert float((h.detach()[m] - b[m]).abs().max()) > 1e-4  # two dropout views differ
    h[m].pow(2).sum().backward()
    for name, prm in model.named_parameters():
        if "layers." in name and "proj" in name:
            assert prm.grad is not None and torch.isfinite(prm.grad).all() and prm.grad.abs().sum() > 0, name
    model.eval()
    seen.clear()
    c, d = hidden(model, ids, mask), hidden(model, ids, mask)
    assert torch.equal(c, d) and seen and all(p == 0.0 for p in seen)


def test_compiled_patched_model_does_not_recompile_per_call():
    """The pre-hook starts a cache generation per forward; traced, the counter's value became
    a guard and every call recompiled until Dynamo's limit (then ran eagerly). Now the
    generation starts eagerly (a graph break at the hook), and the graphs stay those of the
    first call."""
    from torch._dynamo.utils import counters

    model = patch_model(tiny_model("llama"), backend="torch").eval()
    ids, mask = batch([6, 4], "right")
    want = hidden(model, ids, mask)
    torch._dynamo.reset()
    counters.clear()
    cm = torch.compile(model, backend="eager")
    with torch.no_grad():
        got = cm(input_ids=ids, attention_mask=mask).last_hidden_state
        graphs = counters["stats"]["unique_graphs"]
        for _ in range(9):
            got = cm(input_ids=ids, attention_mask=mask).last_hidden_state
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"]
    m = mask.bool()
    assert float((got[m] - want[m]).abs().max()) <= bound(want)


def test_compiled_mntp_model_keeps_its_graphs_for_any_labelled_count():
    """The fused MNTP loss runs eagerly inside compiled code: traced, its chunk loop guarded
    on the number of labelled tokens, and each batch with another count compiled again."""
    from torch._dynamo.utils import counters

    model = patch_model(tiny_model("llama", causal_lm=True), mntp=True, backend="torch").train()
    ids, mask = batch([9, 6, 8], "right")
    torch._dynamo.reset()
    counters.clear()
    cm = torch.compile(model, backend="aot_eager")
    graphs = None
    for n_lab in (2, 5, 7):
        labels = torch.full_like(ids, -100)
        labels[:, 1:1 + n_lab] = ids[:, 1:1 + n_lab]
        got = cm(input_ids=ids, attention_mask=mask, labels=labels).loss
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
        graphs = graphs or counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs, n_lab


# --------------------------------------------------------------------------------------
# GPU (run by the lead on the GPU machine): the compiled kernels inside real layers.
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", SUPPORTED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_auto_backend_matches_reference(model_type, dtype):
    """backend="auto" on CUDA (the Triton kernels) vs the reference backend in the same dtype,
    both judged against an fp64 oracle; hidden states and every parameter gradient."""
    dev = torch.device("cuda")
    lengths = [200, 37, 129, 1]
    ids, mask = batch(lengths, "left")
    ids, mask = ids.to(dev), mask.to(dev)
    m = mask.bool()

    def run(backend, dt):
        model = patch_model(tiny_model(model_type, head_dim=64, dtype=dt).to(dev), backend=backend)
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state[m]
        w = torch.randn(h.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dev)
        (h.double() * w).sum().backward()
        return h.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}

    got, g_got = run("auto", dtype)
    want, g_want = run("torch", dtype)
    oracle, g_oracle = run("torch", torch.float64)
    err = float((got - oracle).abs().max())
    budget = 2 * float((want - oracle).abs().max()) + 1e-5 * float(oracle.abs().max())
    assert err <= budget, f"hidden: {err:.3e} > {budget:.3e}"
    for n, g in g_oracle.items():
        err = float((g_got[n] - g).abs().max())
        budget = 3 * float((g_want[n] - g).abs().max()) + 1e-5 * float(g.abs().max())
        assert err <= budget, f"{n}: {err:.3e} > {budget:.3e}"


@pytest.mark.gpu
def test_gpu_flash_attn_backend_if_installed():
    pytest.importorskip("flash_attn")
    dev = torch.device("cuda")
    ids, mask = batch([50, 17, 33], "right")
    ids, mask = ids.to(dev), mask.to(dev)
    m = mask.bool()
    got = hidden(patch_model(tiny_model("llama", head_dim=64, dtype=torch.bfloat16).to(dev), backend="flash_attn"), ids, mask)
    want = hidden(patch_model(tiny_model("llama", head_dim=64, dtype=torch.bfloat16).to(dev), backend="torch"), ids, mask)
    oracle = hidden(patch_model(tiny_model("llama", head_dim=64, dtype=torch.float64).to(dev), backend="torch"), ids, mask)
    err = float((got[m].double() - oracle[m]).abs().max())
    assert err <= 2 * float((want[m].double() - oracle[m]).abs().max()) + 1e-5 * float(oracle[m].abs().max())


def test_custom_4d_mask_runs_the_eager_fallback_and_a_kv_cache_is_refused(monkeypatch):
    import llm2vec_fast.ops._dispatch as dispatch

    monkeypatch.setattr(dispatch, "_WARNED", set())
    model = patch_model(tiny_model("mistral", dtype=torch.float64))
    ids, mask = batch([8, 5], "left")
    want = hidden(model, ids, mask)
    m = mask.bool()
    add = torch.zeros(2, 1, 8, 8, dtype=torch.float64).masked_fill(~m[:, None, None, :], float("-inf"))
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with pytest.warns(RuntimeWarning, match="custom 4-d mask"):
        got = hidden(model, ids, add, position_ids=pos)  # a caller's 4-d mask is honoured as given
    assert float((got[m] - want[m]).abs().max()) <= bound(want[m])
    # An explicit KV cache: the query is shorter than the keys. The cached tokens never saw the
    # new one, so a cached step differs from the bidirectional model's result on the whole
    # sequence (it ran with a speed warning only): refused, naming use_cache.
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)  # no cache yet: fine
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        with pytest.raises(ValueError, match="use_cache: .* bidirectional"):
            model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                  past_key_values=cache, use_cache=True)


def test_generate_with_a_cache_is_refused_and_without_runs_the_whole_sequence():
    """generate() on a patched causal LM picked other tokens with its default cache than
    without (cached steps cannot be bidirectional); it is refused, use_cache=False runs."""
    model = patch_model(tiny_model("llama", causal_lm=True, dtype=torch.float64)).eval()
    ids, mask = batch([6, 6], "right")
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=False)
    assert out.shape == (2, 9)
    # each new token is the argmax of the patched model's logits on the whole sequence so far
    with torch.no_grad():
        nxt = model(input_ids=out[:, :8], attention_mask=torch.ones(2, 8, dtype=mask.dtype)).logits[:, -1].argmax(-1)
    assert torch.equal(nxt, out[:, 8])


def test_patched_model_runs_under_inference_mode_with_an_int_mask():
    # Inference tensors carry no version counter: the once-per-forward cache must cope.
    model = patch_model(tiny_model("llama"), backend="torch")
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.inference_mode():
        ids_i, mask_i = ids.clone(), mask.clone()
        got = model(input_ids=ids_i, attention_mask=mask_i).last_hidden_state
    assert torch.equal(got[mask.bool()], want.detach()[mask.bool()])


def test_patched_model_trains_under_bf16_autocast():
    # Rotary embeddings hand fp32 q/k to attention while v comes from a bf16 autocast matmul.
    model = patch_model(tiny_model("llama"), backend="torch")
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    rel = (out.float() - ref).abs().max() / ref.abs().max()
    assert rel < 0.1, f"bf16 autocast output differs from fp32 by {float(rel):.3f} (relative)"


# --------------------------------------------------------------------------------------
# MNTP wrapper: transformers' ignore_index, return_dict=False, autocast
# --------------------------------------------------------------------------------------


def _mntp_batch(ignore=-100):
    ids, mask = batch([12, 7, 10], "right")
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, ignore))
    labels[:, 3] = ids[:, 3]
    labels[mask == 0] = ignore
    return ids, mask, labels


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_mntp_ignore_index_matches_transformers(model_type):
    """``ignore_index=`` (a ForCausalLMLoss keyword) reaches the fused loss, not the base model:
    the loss equals the unpatched model's with the same keyword, with labels, shift_labels and
    num_items_in_batch, and the gradients too."""
    ids, mask, labels = _mntp_batch(ignore=-1)
    shift = torch.full_like(labels, -1)
    shift[:, :-1] = labels[:, 1:]
    full = patch_model(tiny_model(model_type, causal_lm=True, dtype=torch.float64))
    fused = patch_model(tiny_model(model_type, causal_lm=True, dtype=torch.float64), mntp=True)
    seen = []
    fused.base_model.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    for kw in (dict(labels=labels), dict(labels=labels, shift_labels=shift),
               dict(labels=labels, num_items_in_batch=torch.tensor(11))):
        want = full(input_ids=ids, attention_mask=mask, ignore_index=-1, **kw).loss
        got = fused(input_ids=ids, attention_mask=mask, ignore_index=-1, **kw).loss
        # transformers' loss runs on fp32 logits (ForCausalLMLoss upcasts with .float()), hence 1e-6
        assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want)), (kw.keys(), float(got), float(want))
    assert seen and not any("ignore_index" in s for s in seen), seen
    want.backward()
    got.backward()
    ref_params = dict(full.named_parameters())
    for name, p in fused.named_parameters():
        g = ref_params[name].grad
        assert float((p.grad - g).abs().max()) <= 1e-6 * float(g.abs().max()) + 1e-12, name


@pytest.mark.parametrize("kw", [dict(), dict(use_cache=True), dict(use_cache=True, output_hidden_states=True),
                                dict(use_cache=False, output_hidden_states=True)],
                         ids=["plain", "cache", "cache-hidden", "hidden"])
def test_mntp_return_dict_false_keeps_logits_place(kw):
    """``return_dict=False``: transformers gives ``(loss, logits, *rest)``; the patched model
    ``(loss, None, *rest)`` with the same ``rest`` in the same places (ModelOutput.to_tuple
    would drop the None logits and move the cache to index 1)."""
    ids, mask, labels = _mntp_batch()
    full = patch_model(tiny_model("llama", causal_lm=True, dtype=torch.float64))
    fused = patch_model(tiny_model("llama", causal_lm=True, dtype=torch.float64), mntp=True)
    with torch.no_grad():
        want = full(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False, **kw)
        got = fused(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False, **kw)
        as_dict = fused(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    assert isinstance(got, tuple) and len(got) == len(want), (len(got), len(want))
    assert got[1] is None and isinstance(want[1], torch.Tensor) and want[1].shape[-1] == VOCAB
    assert abs(float(got[0]) - float(want[0])) <= 1e-6 * abs(float(want[0]))
    assert [type(x) for x in got[2:]] == [type(x) for x in want[2:]]
    if kw.get("output_hidden_states"):
        hs, hs_want = got[-1], want[-1]
        assert len(hs) == len(hs_want) and all(torch.equal(a, b) for a, b in zip(hs, hs_want))
    assert as_dict.logits is None and float(as_dict.loss) == float(got[0])


def _mntp_autocast(model, ids, mask, labels, dtype):
    with torch.autocast("cpu", dtype=dtype):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
    return out.loss.detach(), model.get_output_embeddings().weight.grad


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=pytest.mark.skip(reason="CPU autocast: bf16 tl.dot is wrong in the "
                                                                 "interpreter (bf16 kernels: test_masked_ce_gpu.py)")),
    torch.float16], ids=["bf16", "fp16"])
def test_mntp_triton_under_autocast(dtype):
    """patch_model(mntp=True, backend='triton') under autocast with fp32 weights (HF Trainer
    bf16=True / fp16=True): it runs, the LM head's operands are in the autocast dtype (as
    transformers' head under autocast), and its loss and LM head gradient equal the torch
    backend's under the same autocast; the loss is within 16-bit rounding of the unpatched
    model's (which makes bf16 / fp16 logits)."""
    pytest.importorskip("llm2vec_fast.kernels.triton.masked_ce")
    ids, mask, labels = _mntp_batch()
    out = {}
    for backend in ("triton", "torch"):
        model = patch_model(tiny_model("llama", causal_lm=True), mntp=True, backend=backend)
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # head dim 16: Triton attention falls back
            out[backend] = _mntp_autocast(model, ids, mask, labels, dtype)
    (lt, gt), (lr, gr) = out["triton"], out["torch"]
    assert gt.dtype == torch.float32 and torch.isfinite(gt).all()
    assert abs(float(lt) - float(lr)) <= 1e-6 * abs(float(lr))
    # the head's gradient comes through its 16-bit copy: each backend rounds it to 16 bits once
    assert float((gt - gr).abs().max()) <= 2 * torch.finfo(dtype).eps * float(gr.abs().max())
    full = patch_model(tiny_model("llama", causal_lm=True), backend="torch")
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        want = full(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(float(lt) - float(want)) <= 2e-2 * abs(float(want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mntp_autocast_with_fp32_head_on_16bit_model(dtype):
    """A 16-bit model whose LM head was kept in fp32, under autocast: the final hidden states
    are 16-bit, the head fp32. transformers' LM head runs in the autocast dtype; the wrapper
    casts the head to the hidden states' dtype the same way (without, the fused loss rejects
    the dtype mismatch), and the head's gradient reaches the fp32 weight."""
    ids, mask, labels = _mntp_batch()
    full = patch_model(tiny_model("llama", causal_lm=True, dtype=dtype), backend="torch")
    fused = patch_model(tiny_model("llama", causal_lm=True, dtype=dtype), mntp=True, backend="torch")
    for m in (full, fused):
        m.get_output_embeddings().float()
    loss, g = _mntp_autocast(fused, ids, mask, labels, dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        want = full(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and (g != 0).any()
    assert abs(float(loss) - float(want)) <= 2e-2 * abs(float(want)), (float(loss), float(want))


def test_lm_head_operands_follow_autocast():
    """The fused MNTP head computes in the dtype transformers' head would: the autocast dtype
    under autocast (fp32 weights, HF Trainer bf16=True), else the hidden states' dtype."""
    from llm2vec_fast.hf.mntp import lm_head_operands

    head = torch.nn.Linear(8, 5, bias=True)
    h32 = torch.randn(2, 3, 8)
    for dt in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dt):
            assert all(t.dtype == dt for t in lm_head_operands(h32, head))
            want = head(h32)
        h, w, b = lm_head_operands(h32.to(dt), head)  # no autocast: a 16-bit model, fp32 head
        assert h.dtype == w.dtype == b.dtype == dt
        assert torch.equal(torch.nn.functional.linear(h, w, b), want)  # what autocast's head computes
    assert all(t.dtype == torch.float32 for t in lm_head_operands(h32, head))


def test_mntp_step_without_labelled_tokens_is_zero_not_nan():
    """num_items_in_batch = 0 (every label of the step ignored): loss 0, gradients 0, not NaN."""
    model = patch_model(tiny_model("llama", causal_lm=True), mntp=True, backend="torch")
    ids = torch.randint(3, 50, (2, 9))
    labels = torch.full_like(ids, -100)
    out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(0))
    out.loss.backward()
    assert float(out.loss) == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

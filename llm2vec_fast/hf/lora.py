"""Memory-lean LoRA training paths for patched models (``patch_model(..., fuse_lora=True)``).

peft computes a LoRA projection as ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` with
ordinary autograd, which keeps, per projection, the dropped copy of ``x`` (for the grad of
``lora_A``) and, on the CPU, a float dropout mask of the same size; in a gated MLP the
activation's input, its output and the product ``act(gate) * up`` are kept as well. For
LLM2Vec's recipes (LoRA on q, k, v, o, gate, up and down, dropout 0.05, frozen base) that is
about two thirds of a decoder layer's saved activations. Two autograd functions replace it:

- :class:`_LoraLinearFn` (attention projections, and MLPs that cannot be fused): saves the
  input ``x`` itself (q, k and v share one), the ``(N, r)`` output of ``lora_A`` and a seed;
  the backward regenerates the dropout mask from the seed.
- :class:`_GatedMLPFn` (Llama / Mistral / Qwen / Gemma MLPs, ``down(act(gate(x)) * up(x))``
  with each projection a frozen ``nn.Linear`` or a LoRA on one): saves ``x``, ``gate(x)``,
  ``up(x)``, the three ``(N, r)`` LoRA intermediates and three seeds; ``act(gate) * up`` and
  the masks are recomputed (elementwise work, no matmul is redone).

Dropout masks come from a counter-seeded generator (one seed drawn from torch's default CPU
generator per projection and call), so ``torch.manual_seed`` reproduces a run, and gradient
checkpointing and GradCache, which replay the RNG state, regenerate the same masks. The
masks are drawn from 31 random bits per element (keep when ``r >= p * 2**31``), the
statistics of peft's Bernoulli masks but not the same draws.

The fast path runs only when autograd is recording, no autocast is active, the base
weights are frozen and each LoRA module is vanilla (one active adapter, no DoRA / variant,
not merged, not disabled, ``nn.Linear`` base without ``fan_in_fan_out``); anything else
calls peft's own forward (unchanged results, no warning needed: nothing is approximated).
"""
from __future__ import annotations

import math
import threading
import types

import torch
import torch.nn.functional as F

_SEED_HIGH = 2**62
_BITS = 2**31  # random_() on int32 draws uniformly from [0, 2**31)

# transformers' activation modules by class name -> the aten forward / backward pair.
_ACTS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
}


def _act_fwd(kind: str, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if kind == "silu":
        return F.silu(g) if out is None else torch.ops.aten.silu.out(g, out=out)
    return F.gelu(g, approximate="tanh") if out is None else torch.ops.aten.gelu.out(g, approximate="tanh", out=out)


def _act_bwd(kind: str, grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if kind == "silu":
        return torch.ops.aten.silu_backward(grad, g)
    return torch.ops.aten.gelu_backward(grad, g, approximate="tanh")


# --------------------------------------------------------------------------------------
# Dropout from a seed
# --------------------------------------------------------------------------------------


def new_seed() -> int:
    """A dropout seed from torch's default CPU generator (replayed by checkpointing)."""
    return int(torch.randint(0, _SEED_HIGH, (), dtype=torch.int64))


class _Scratch(threading.local):
    """Per-thread reusable CPU buffers for the temporaries of one projection at a time.

    glibc does not return the holes that a layer's freed temporaries leave between the
    tensors saved for the backward, so on the CPU every fresh temporary adds to peak resident
    memory (measured: a 30-layer step's RSS grew ~2x its saved tensors); reusing one buffer per
    role keeps those temporaries out of the heap. CUDA tensors use the caching allocator.
    """

    def __init__(self):
        self.bufs: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, shape, dtype, device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        n = math.prod(shape)
        key = (role, dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            self.bufs[key] = buf
        return buf[:n].view(shape)


_scratch = _Scratch()


def keep_mask(shape, p: float, seed: int, device, role: str = "mask") -> torch.Tensor:
    """Bool keep-mask of ``shape``, ``P(keep) = 1 - p`` to 31-bit resolution, fixed by ``seed``.

    On the CPU the result lives in a scratch buffer (valid until the next call with the same
    ``role`` on this thread); pass ``role=None`` for a fresh tensor.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    if role is None:
        r = torch.empty(shape, dtype=torch.int32, device=device).random_(generator=gen)
        return r >= int(round(p * _BITS))
    r = _scratch.get("rand", shape, torch.int32, device).random_(generator=gen)
    return torch.ge(r, int(round(p * _BITS)), out=_scratch.get(role, shape, torch.bool, device))


def _dropped(x2: torch.Tensor, p: float, seed: int | None, mask=None) -> torch.Tensor:
    """``dropout(x2)`` with the mask of ``seed`` in a scratch buffer (``x2`` when no dropout)."""
    if seed is None:
        return x2
    if mask is None:
        mask = keep_mask(x2.shape, p, seed, x2.device)
    out = torch.mul(x2, mask, out=_scratch.get("drop", x2.shape, x2.dtype, x2.device))
    return out.mul_(1.0 / (1.0 - p))


# --------------------------------------------------------------------------------------
# One LoRA projection: y = x W^T + b + s * (drop(x) A^T) B^T
# --------------------------------------------------------------------------------------


def _lora_fwd(x2, W, b, lora, p, seed):
    """Forward of one projection on 2-D ``x2``; returns ``(y, h)`` with ``h = drop(x) A^T``.

    ``lora`` is ``(A, B, scaling)`` or None (a frozen plain linear). The LoRA branch runs in
    A's dtype (peft casts the input to it) and is added in y's dtype, as peft does.
    """
    y = F.linear(x2, W, b)
    if lora is None:
        return y, None
    A, B, s = lora
    xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
    h = _dropped(xa, p, seed) @ A.t()
    if y.dtype == A.dtype:
        y.addmm_(h, B.t(), alpha=s)
    else:
        y = (y + (h @ B.t()) * s).to(y.dtype)
    return y, h


def _lora_bwd(g2, x2, W, lora, h, p, seed, need_dx: bool):
    """Backward of :func:`_lora_fwd`: ``(dx, dA, dB)`` (dx None unless ``need_dx``).

    The dropout mask is regenerated once from ``seed`` and used for both dA and dx.
    """
    dx = g2 @ W if need_dx else None
    if lora is None:
        return dx, None, None
    A, B, s = lora
    ga = g2 if g2.dtype == A.dtype else g2.to(A.dtype)
    dB = (ga.t() @ h) * s if B.requires_grad else None
    t = ga @ B  # (N, r)
    mask = keep_mask(x2.shape, p, seed, x2.device) if seed is not None else None
    dA = None
    if A.requires_grad:
        xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
        dA = (t.t() @ _dropped(xa, p, seed, mask)) * s
    if need_dx:
        lx = torch.mm(t, A, out=_scratch.get("drop", x2.shape, A.dtype, x2.device))
        lx.mul_(s if mask is None else s / (1.0 - p))
        if mask is not None:
            lx.mul_(mask)
        dx.add_(lx)
    return dx, dA, dB


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, A, B, s, p, seed):
        x2 = x.reshape(-1, x.shape[-1])
        y, h = _lora_fwd(x2, W, b, (A, B, s), p, seed)
        ctx.save_for_backward(x, W, A, B, h)
        ctx.cfg = (s, p, seed)
        return y.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, W, A, B, h = ctx.saved_tensors
        s, p, seed = ctx.cfg
        g2 = g.reshape(-1, g.shape[-1])
        dx, dA, dB = _lora_bwd(g2, x.reshape(-1, x.shape[-1]), W, (A, B, s), h, p, seed, ctx.needs_input_grad[0])
        if dx is not None:
            dx = dx.view(x.shape)
        return dx, None, None, dA, dB, None, None, None


class _GatedMLPFn(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` with optional LoRA on each of the three projections.

    ``proj`` is a tuple of three ``(W, b, A, B, s, p)`` (A, B, s None without LoRA; p 0
    without dropout); tensors arrive as positional arguments so autograd sees them.
    """

    @staticmethod
    def forward(ctx, x, kind, cfg, *tensors):
        # tensors: per projection W, b, A, B -> 12 tensors (None where absent)
        proj = [tensors[4 * i: 4 * i + 4] for i in range(3)]
        seeds = [new_seed() if (c[1] > 0 and proj[i][2] is not None) else None for i, c in enumerate(cfg)]
        x2 = x.reshape(-1, x.shape[-1])
        outs, hs = [], []
        for i in range(2):
            W, b, A, B = proj[i]
            lora = (A, B, cfg[i][0]) if A is not None else None
            y, h = _lora_fwd(x2, W, b, lora, cfg[i][1], seeds[i])
            outs.append(y)
            hs.append(h)
        g, u = outs
        a = _act_fwd(kind, g, out=_scratch.get("mlp_a", g.shape, g.dtype, g.device)).mul_(u)
        W, b, A, B = proj[2]
        lora = (A, B, cfg[2][0]) if A is not None else None
        y, hd = _lora_fwd(a, W, b, lora, cfg[2][1], seeds[2])
        del a
        hs.append(hd)
        ctx.save_for_backward(x, g, u, *hs, *tensors)
        ctx.meta = (kind, cfg, seeds)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        kind, cfg, seeds = ctx.meta
        saved = ctx.saved_tensors
        x, g, u = saved[:3]
        hs = saved[3:6]
        tensors = saved[6:]
        proj = [tensors[4 * i: 4 * i + 4] for i in range(3)]
        grads = [None] * 12
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])

        def lora_of(i):
            W, b, A, B = proj[i]
            return (A, B, cfg[i][0]) if A is not None else None

        act_g = _act_fwd(kind, g, out=_scratch.get("mlp_act", g.shape, g.dtype, g.device))
        a = torch.mul(act_g, u, out=_scratch.get("mlp_a", g.shape, g.dtype, g.device))
        da, grads[10], grads[11] = _lora_bwd(dy2, a, proj[2][0], lora_of(2), hs[2], cfg[2][1], seeds[2], True)
        del a
        # dg = act'(g) * (da * u), du = da * act(g): one fresh tensor each, da reused in place
        du = da * act_g
        dg = _act_bwd(kind, da.mul_(u), g)
        del da
        need_dx = ctx.needs_input_grad[0]
        dx = None
        for i, dz in ((0, dg), (1, du)):
            dxi, grads[4 * i + 2], grads[4 * i + 3] = _lora_bwd(
                dz, x2, proj[i][0], lora_of(i), hs[i], cfg[i][1], seeds[i], need_dx)
            if dxi is not None:
                dx = dxi if dx is None else dx.add_(dxi)
        if dx is not None:
            dx = dx.view(x.shape)
        return (dx, None, None, *grads)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a frozen weight: saves the input and ``rstd`` (as transformers' does) but
    makes one full-size temporary instead of three. ``gemma``: ``(x_hat * (1 + w)).to(dtype)``
    (Gemma / Gemma2), else ``w * x_hat.to(dtype)`` (Llama, Mistral, Qwen2/3, Phi3)."""

    @staticmethod
    def forward(ctx, x, w, eps, gemma):
        xf = x if x.dtype == torch.float32 else x.float()
        sq = torch.square(xf, out=_scratch.get("norm", xf.shape, torch.float32, xf.device))
        rstd = torch.rsqrt(sq.mean(-1, keepdim=True).add_(eps))
        if gemma:
            y = (xf * rstd).mul_(1.0 + w.float()).to(x.dtype)
        elif x.dtype == torch.float32:
            y = torch.mul(xf, rstd)
            y = y.mul_(w) if w.dtype == torch.float32 else w * y
        else:
            y = w * torch.mul(xf, rstd, out=_scratch.get("norm", xf.shape, torch.float32, xf.device)).to(x.dtype)
        ctx.save_for_backward(x, rstd, w)
        ctx.gemma = gemma
        return y

    @staticmethod
    def backward(ctx, g):
        x, rstd, w = ctx.saved_tensors
        xf = x if x.dtype == torch.float32 else x.float()
        xhat = torch.mul(xf, rstd, out=_scratch.get("norm", xf.shape, torch.float32, xf.device))
        gx = g.float() * (1.0 + w.float()) if ctx.gemma else (g * w).float()
        m = (gx * xhat).mean(-1, keepdim=True)
        dx = gx.sub_(xhat.mul_(m)).mul_(rstd)
        return dx.to(x.dtype), None, None, None


# RMSNorm classes by name -> (epsilon attribute, Gemma formula)
_NORMS = {
    "LlamaRMSNorm": ("variance_epsilon", False),
    "MistralRMSNorm": ("variance_epsilon", False),
    "Qwen2RMSNorm": ("variance_epsilon", False),
    "Qwen3RMSNorm": ("variance_epsilon", False),
    "Phi3RMSNorm": ("variance_epsilon", False),
    "GemmaRMSNorm": ("eps", True),
    "Gemma2RMSNorm": ("eps", True),
}


def make_rms_norm_forward(norm):
    """An instance ``forward`` running :class:`_RMSNormFn` in training with a frozen weight."""
    orig = type(norm).forward
    eps_attr, gemma = _NORMS[type(norm).__name__]

    def forward(self, x):
        if _fast_ok(x) and not self.weight.requires_grad and x.requires_grad:
            return _RMSNormFn.apply(x, self.weight, float(getattr(self, eps_attr)), gemma)
        return orig(self, x)

    return types.MethodType(forward, norm)


# --------------------------------------------------------------------------------------
# Which modules qualify
# --------------------------------------------------------------------------------------


def lora_parts(module):
    """``(W, b, A, B, scaling, p)`` for a frozen ``nn.Linear`` (A, B, scaling None, p 0) or a
    vanilla peft LoRA ``Linear`` in its current state; None when the fast path does not apply."""
    if type(module) is torch.nn.Linear:
        if module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad):
            return None
        return module.weight, module.bias, None, None, None, 0.0
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(module, "lora_A"):
        return None
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return None
    if getattr(module, "fan_in_fan_out", False):
        return None
    active = module.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return None
    if getattr(module, "use_dora", {}).get(name, False) or getattr(module, "lora_bias", {}).get(name, False):
        return None
    if not getattr(module, "cast_input_dtype_enabled", True):
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    A, B = module.lora_A[name], module.lora_B[name]
    if type(A) is not torch.nn.Linear or type(B) is not torch.nn.Linear or A.bias is not None or B.bias is not None:
        return None
    drop = module.lora_dropout[name]
    if isinstance(drop, torch.nn.Identity):
        p = 0.0
    elif type(drop) is torch.nn.Dropout and not drop.inplace:
        p = float(drop.p) if drop.training else 0.0
    else:
        return None
    if A.weight.dtype != B.weight.dtype:
        return None
    return base.weight, base.bias, A.weight, B.weight, float(module.scaling[name]), p


def _fast_ok(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)


def _fast_lora_forward(self, x, *args, **kwargs):
    """Instance ``forward`` of a peft LoRA ``Linear``: :class:`_LoraLinearFn` when it applies."""
    parts = None if (args or kwargs or not _fast_ok(x)) else lora_parts(self)
    if parts is None or parts[2] is None or x.dtype != parts[0].dtype:
        return type(self).forward(self, x, *args, **kwargs)
    W, b, A, B, s, p = parts
    seed = new_seed() if p > 0 else None
    return _LoraLinearFn.apply(x, W, b, A, B, s, p, seed)


def make_gated_mlp_forward(mlp, kind: str):
    """An instance ``forward`` for a gated MLP (``gate_proj`` / ``up_proj`` / ``down_proj``)."""
    orig = type(mlp).forward

    def forward(self, x):
        if _fast_ok(x):
            parts = [lora_parts(getattr(self, n)) for n in ("gate_proj", "up_proj", "down_proj")]
            if all(pt is not None for pt in parts) and all(pt[0].dtype == x.dtype for pt in parts) \
                    and any(pt[2] is not None for pt in parts):
                cfg = tuple((pt[4], pt[5]) for pt in parts)
                tensors = [t for pt in parts for t in pt[:4]]
                return _GatedMLPFn.apply(x, kind, cfg, *tensors)
        return orig(self, x)

    return types.MethodType(forward, mlp)


def gated_mlp_kind(mlp) -> str | None:
    """``"silu"`` / ``"gelu_tanh"`` for a gate/up/down MLP with a known activation, else None."""
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    return _ACTS.get(type(mlp.act_fn).__name__)


# --------------------------------------------------------------------------------------
# Installation (driven by patch_model's forward pre-hook)
# --------------------------------------------------------------------------------------

_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")


class LoraFusion:
    """Instance forwards installed on a model's MLPs and LoRA projections, and their removal.

    peft may wrap the projections after ``patch_model`` ran (the pipeline's order), so the
    projections are looked up again before every forward (:meth:`sync`, ~200 attribute
    reads for a 30-layer model) and a LoRA module without the fast forward gets it then.
    """

    def __init__(self, hf):
        self.mlps: list[torch.nn.Module] = []
        self.slots: list[tuple[torch.nn.Module, str]] = []
        self.installed: list[torch.nn.Module] = []
        for m in hf.modules():
            kind = gated_mlp_kind(m)
            if kind is not None and "forward" not in m.__dict__:
                m.forward = make_gated_mlp_forward(m, kind)
                self.mlps.append(m)
            if type(m).__name__ in _NORMS and "forward" not in m.__dict__ and hasattr(m, "weight"):
                m.forward = make_rms_norm_forward(m)
                self.mlps.append(m)
            for n in _LINEAR_NAMES:
                if isinstance(getattr(m, n, None), torch.nn.Module):
                    self.slots.append((m, n))
        self.sync()

    def sync(self):
        for parent, name in self.slots:
            child = getattr(parent, name)
            if "forward" not in child.__dict__ and hasattr(child, "lora_A") and hasattr(child, "base_layer"):
                child.forward = types.MethodType(_fast_lora_forward, child)
                self.installed.append(child)

    def remove(self):
        for m in self.mlps + self.installed:
            m.__dict__.pop("forward", None)
        self.mlps, self.installed = [], []

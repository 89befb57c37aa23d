"""Memory-lean LoRA training paths for patched models (``patch_model(..., fuse_lora=...)``).

peft computes a LoRA projection as ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` with
ordinary autograd, which keeps, per projection, the dropped copy of ``x`` (for the grad of
``lora_A``) and, on the CPU, a float dropout mask of the same size; in a gated MLP the
activation's input, its output and the product ``act(gate) * up`` are kept as well. For
LLM2Vec's recipes (LoRA on q, k, v, o, gate, up and down, dropout 0.05, frozen base) that is
about two thirds of a decoder layer's saved activations (SmolLM2-135M, 8 x 128 tokens: 62 MB
per layer; 24 MB with the functions below). Three autograd functions replace it:

- :class:`_LoraLinearFn` (attention projections, and MLPs that cannot be fused): saves the
  input ``x`` (q, k and v share one), the ``(N, r)`` output of ``lora_A`` and the dropout.
- :class:`_GatedMLPFn` (Llama / Mistral / Qwen / Gemma MLPs, ``down(act(gate(x)) * up(x))``
  with each projection a frozen ``nn.Linear`` or a LoRA on one): saves ``x``, ``gate(x)``,
  ``up(x)``, the three ``(N, r)`` LoRA intermediates and the dropouts; ``act(gate) * up`` is
  recomputed (elementwise work, no matmul is redone).
- :class:`_RMSNormFn` (frozen weight): saves what transformers' norm saves with fewer
  temporaries; a projection fed by it keeps the norm's input (kept anyway) instead of its
  output and re-applies the norm in its backward (:func:`_norm_source`).

Dropout: on the CPU (``p <= SPARSE_MAX_P``) the dropped elements are drawn as positions with
Geometric(p) gaps (exactly an iid Bernoulli mask, ~p n draws), the LoRA products corrected at
them, and their int32 positions kept for the backward; elsewhere a dense mask comes from a
generator seeded per projection and call, regenerated in the backward (each random int32
decides two elements by its 16-bit halves, ``P(keep)`` within 3e-5 of ``1 - p``). Seeds are
drawn from torch's default CPU generator, so ``torch.manual_seed`` reproduces a run and
gradient checkpointing and GradCache, which replay the RNG state, redraw the same masks: the
statistics of peft's masks, not the same draws. CPU temporaries live in per-thread scratch
buffers (:class:`_Scratch`), since glibc keeps the holes freed temporaries leave.

Where: ``fuse_lora="auto"`` (patch_model's default) fuses CPU inputs only. On an H200 the
fused step was slower than peft's (llama-1b config, bf16, MNTP 8 x 512, gradient
checkpointing: 304 vs 255 ms per step for 3652 vs 3811 MB peak; benchmarks/results/e2e.jsonl,
git 71fe4ae): such a step looks bound by the host's launches (not yet profiled), and the
functions' dense-mask dropout and Python-issued backward add launches there. ``fuse_lora=True`` fuses on every
device (the memory saving).

The fast path runs only when autograd is recording (or a LoRA dropout is active: a first pass
without grad, GradCache's or reentrant checkpointing's, must draw the masks its replay
draws), no autocast is active, no hook is registered on a module it reads without calling
(``gate_proj``, ``base_layer``, ... : forward / backward hooks, peft's mixed-adapter batches),
the base weights are frozen and each LoRA module is vanilla (one active adapter, no DoRA /
variant, not merged, not disabled, ``nn.Linear`` base without ``fan_in_fan_out``); anything
else calls peft's own forward (unchanged results, no warning needed: nothing is approximated).
"""
from __future__ import annotations

import copy
import functools
import math
import sys
import threading
import types
import warnings
import weakref

import torch
import torch.nn.functional as F

_SEED_HIGH = 2**62

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


def _thresholds(p: float) -> tuple[int, int]:
    """Keep thresholds for the two 16-bit halves of a ``random_()`` int32 (31 random bits):
    the low half, read as int16, is uniform on [-2**15, 2**15) and the high half on
    [0, 2**15); an element is kept when its half is >= its threshold."""
    lo = min(-(2**15) + int(round(p * 2**16)), 2**15 - 1)
    hi = min(int(round(p * 2**15)), 2**15 - 1)
    return (lo, hi) if sys.byteorder == "little" else (hi, lo)


@functools.lru_cache(maxsize=64)
def _threshold_tensor(p: float, device: torch.device) -> torch.Tensor:
    """The two thresholds as a device tensor, made once per (p, device): no host-to-device copy
    per call."""
    return torch.tensor(_thresholds(p), dtype=torch.int16, device=device)


def keep_mask(shape, p: float, seed: int, device, role: str | None = "mask") -> torch.Tensor:
    """Bool keep-mask of ``shape`` fixed by ``seed``: ``P(keep) = 1 - p`` to 16-bit (even
    elements) and 15-bit (odd elements) resolution, i.e. within 3e-5 of ``p``.

    Each int32 that ``random_`` draws (31 random bits) decides two elements, half the draws
    of one-per-element (the generator is the cost: ~1.3 ms per 590k elements on this CPU).
    On the CPU the result lives in a scratch buffer (valid until the next call with the same
    ``role`` on this thread); ``role=None`` gives a fresh tensor.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    n = math.prod(shape)
    m = (n + 1) // 2
    if role is None:
        r = torch.empty(m, dtype=torch.int32, device=device)
        out = torch.empty(m, 2, dtype=torch.bool, device=device)
    else:
        r = _scratch.get("rand", (m,), torch.int32, device)
        out = _scratch.get(role, (m, 2), torch.bool, device)
    r.random_(generator=gen)
    thr = _threshold_tensor(p, device)
    torch.ge(r.view(torch.int16).view(m, 2), thr, out=out)
    return out.view(-1)[:n].view(shape)


def _masked(t: torch.Tensor, mask: torch.Tensor, role: str = "drop") -> torch.Tensor:
    """``t`` with dropped elements zeroed, in a scratch buffer (no scaling: callers fold
    ``1 / (1 - p)`` into a small factor)."""
    return torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device),
                       out=_scratch.get(role, t.shape, t.dtype, t.device))


# LoRA dropout is small (0.05 in LLM2Vec's recipes): on the CPU the dropped elements are
# drawn as positions (the gaps between them are geometric, which is exactly an iid Bernoulli
# mask), ~p n draws instead of n, and the LoRA products are corrected at those positions
# instead of masking a full-size copy of x. Above this p the dense mask is cheaper.
SPARSE_MAX_P = 0.25


def dropped_positions(n: int, p: float, seed: int) -> torch.Tensor:
    """Sorted flat indices (int64, CPU) of the dropped elements of an ``n``-element iid
    Bernoulli(``p``) dropout, fixed by ``seed``: gaps ``floor(log(1 - U) / log(1 - p))``
    between drops are Geometric(p), the law of a Bernoulli process's runs of kept elements."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    lp = math.log1p(-p)
    mean = n * p
    k = int(mean + 6.0 * math.sqrt(mean) + 16)
    parts, last = [], -1
    while last < n:
        u = torch.rand(k, generator=gen, dtype=torch.float64)
        pos = torch.floor(torch.log1p(-u).div_(lp)).to(torch.int64).add_(1).cumsum_(0).add_(last)
        parts.append(pos)
        last = int(pos[-1])
        k = max(16, k // 4)
    pos = torch.cat(parts) if len(parts) > 1 else parts[0]
    return pos[: int(torch.searchsorted(pos, n))]


def _use_sparse(p: float, device) -> bool:
    return device.type == "cpu" and p <= SPARSE_MAX_P


class _Drops:
    """The dropped elements of an ``(N, C)`` input: flat positions, their rows and columns."""

    def __init__(self, N: int, C: int, p: float, seed: int, pos: torch.Tensor | None = None):
        self.shape = (N, C)
        self.pos = dropped_positions(N * C, p, seed) if pos is None else pos.long()
        self.i = torch.div(self.pos, C, rounding_mode="floor")
        self.j = self.pos - self.i * C

    def rows_times(self, x2: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """``(x * dropped) @ M`` for ``M (C, r)``: the dropped part of ``x`` as a CSR matrix
        (its rows are sorted already) times ``M`` (fp32 / fp64), else by ``index_add_``."""
        N, C = self.shape
        vals = x2.reshape(-1).take(self.pos)
        if vals.dtype in (torch.float32, torch.float64):
            crow = torch.zeros(N + 1, dtype=torch.int64)
            torch.cumsum(torch.bincount(self.i, minlength=N), 0, out=crow[1:])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                S = torch.sparse_csr_tensor(crow, self.j, vals, (N, C), check_invariants=False)
                return S @ M.contiguous()
        out = torch.zeros(N, M.shape[1], dtype=M.dtype)
        return out.index_add_(0, self.i, M.index_select(0, self.j) * vals.unsqueeze(1).to(M.dtype))

    def cols_times(self, x2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(x * dropped)^T @ t`` for ``t (N, r)``, by ``index_add_`` over the columns."""
        C = self.shape[1]
        vals = x2.reshape(-1).take(self.pos).to(t.dtype)
        out = torch.zeros(C, t.shape[1], dtype=t.dtype)
        return out.index_add_(0, self.j, t.index_select(0, self.i) * vals.unsqueeze(1))


def dropout_keep(shape, p: float, seed: int, device="cpu") -> torch.Tensor:
    """The bool keep-mask the fused code uses for ``(shape, p, seed)`` on ``device``, as a
    fresh tensor (tests and explicit references; the fused code never builds it sparse)."""
    device = torch.device(device)
    if _use_sparse(p, device):
        keep = torch.ones(math.prod(shape), dtype=torch.bool)
        keep[dropped_positions(math.prod(shape), p, seed)] = False
        return keep.view(shape)
    return keep_mask(shape, p, seed, device, role=None)


# --------------------------------------------------------------------------------------
# One LoRA projection: y = x W^T + b + s * (drop(x) A^T) B^T
# --------------------------------------------------------------------------------------


def _lora_fwd(x2, W, b, lora, p, seed):
    """Forward of one projection on 2-D ``x2``; returns ``(y, h, pos)`` with ``h = drop(x) A^T``
    and ``pos`` the dropped positions (int32) on the sparse path, for the backward, else None.

    ``lora`` is ``(A, B, scaling)`` or None (a frozen plain linear). The LoRA branch runs in
    A's dtype (peft casts the input to it) and is added in y's dtype, as peft does. The
    dropout scale ``1 / (1 - p)`` is applied to the ``(N, r)`` product, not to ``x``.
    """
    y = F.linear(x2, W, b)
    if lora is None:
        return y, None, None
    A, B, s = lora
    xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
    pos = None
    if seed is None:
        h = xa @ A.t()
    elif _use_sparse(p, x2.device):
        # h = (x - x * dropped) A^T: the dense product minus the sparse one
        drops = _Drops(xa.shape[0], xa.shape[1], p, seed)
        h = (xa @ A.t()).sub_(drops.rows_times(xa, A.t())).mul_(1.0 / (1.0 - p))
        # 4 bytes per dropped element, instead of redrawing (int64 past 2**31 positions)
        pos = drops.pos.to(torch.int32) if xa.numel() < 2**31 else drops.pos
    else:
        h = (_masked(xa, keep_mask(x2.shape, p, seed, x2.device)) @ A.t()).mul_(1.0 / (1.0 - p))
    if y.dtype == A.dtype:
        y.addmm_(h, B.t(), alpha=s)
    else:
        y = (y + (h @ B.t()) * s).to(y.dtype)
    return y, h, pos


def _lora_bwd(g2, x2, W, lora, h, p, seed, need_dx: bool, pos=None):
    """Backward of :func:`_lora_fwd`: ``(dx, dA, dB)`` (dx None unless ``need_dx``).

    The dropped positions come from the forward (``pos``); a dense mask is regenerated once
    from ``seed`` and used for both dA and dx.
    """
    dx = g2 @ W if need_dx else None
    if lora is None:
        return dx, None, None
    A, B, s = lora
    ga = g2 if g2.dtype == A.dtype else g2.to(A.dtype)
    dB = (ga.t() @ h) * s if B.requires_grad else None
    t = ga @ B  # (N, r)
    k = s if seed is None else s / (1.0 - p)
    if seed is not None and _use_sparse(p, x2.device):
        drops = _Drops(x2.shape[0], x2.shape[1], p, seed, pos)
        dA = None
        if A.requires_grad:
            xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
            # dA^T = (x - x * dropped)^T t
            dA = (xa.t() @ t).sub_(drops.cols_times(xa, t)).t().mul_(k)
        if need_dx:
            # dx += (k t A) with the dropped elements zeroed
            lx = torch.mm(t.mul_(k), A, out=_scratch.get("drop", x2.shape, A.dtype, x2.device))
            lx.view(-1).index_fill_(0, drops.pos, 0)
            dx.add_(lx)
        return dx, dA, dB
    mask = keep_mask(x2.shape, p, seed, x2.device) if seed is not None else None
    dA = None
    if A.requires_grad:
        xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
        dA = (t.t() @ (xa if mask is None else _masked(xa, mask))).mul_(k)
    if need_dx:
        lx = torch.mm(t.mul_(k), A, out=_scratch.get("drop", x2.shape, A.dtype, x2.device))
        if mask is not None:
            lx = _masked(lx, mask, role="drop2")
        dx.add_(lx)
    return dx, dA, dB


def _norm_source(x):
    """``(h, rstd, w, gemma)`` when ``x`` is, untouched, the output of :class:`_RMSNormFn`
    (its input, ``rstd`` and weight are then kept by that node anyway), else None."""
    fn = x.grad_fn
    if fn is None or type(fn) is not _RMSNormFn._backward_cls or x._version != fn.out_version:
        return None
    h_ref, rstd_ref, w_ref, eps = fn.src
    h, w = h_ref(), w_ref()
    if h is None or w is None:
        return None
    rstd = rstd_ref()
    if rstd is None:
        rstd = _norm_rstd(h, eps)
    return h, rstd, w, fn.gemma


def _x_saved(ctx, x, src):
    """What to save for ``x``: the norm's input and rstd when ``x`` is a norm output."""
    if src is None:
        ctx.norm = None
        return (x, None, None)
    ctx.norm = src[3]  # the Gemma flag
    return (src[0], src[1], src[2])


def _x_restored(ctx, a, b, c):
    if ctx.norm is None:
        return a
    return _norm_apply(a, b, c, ctx.norm)


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, A, B, s, p, seed, src=None):
        x2 = x.reshape(-1, x.shape[-1])
        y, h, pos = _lora_fwd(x2, W, b, (A, B, s), p, seed)
        ctx.save_for_backward(*_x_saved(ctx, x, src), W, A, B, h, pos)
        ctx.cfg = (s, p, seed, x.shape)
        return y.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, g):
        xa, xb, xc, W, A, B, h, pos = ctx.saved_tensors
        s, p, seed, shape = ctx.cfg
        x2 = _x_restored(ctx, xa, xb, xc).reshape(-1, shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        dx, dA, dB = _lora_bwd(g2, x2, W, (A, B, s), h, p, seed, ctx.needs_input_grad[0], pos)
        if dx is not None:
            dx = dx.view(shape)
        return dx, None, None, dA, dB, None, None, None, None


class _GatedMLPFn(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` with optional LoRA on each of the three projections.

    ``cfg`` holds ``(scaling, p)`` per projection (p 0 without dropout); the tensors arrive as
    positional arguments, ``W, b, A, B`` per projection (A, B None without LoRA), so autograd
    sees them; ``src`` is :func:`_norm_source` of ``x`` or None.
    """

    @staticmethod
    def forward(ctx, x, kind, cfg, src, *tensors):
        # tensors: per projection W, b, A, B -> 12 tensors (None where absent)
        proj = [tensors[4 * i: 4 * i + 4] for i in range(3)]
        seeds = [new_seed() if (c[1] > 0 and proj[i][2] is not None) else None for i, c in enumerate(cfg)]
        x2 = x.reshape(-1, x.shape[-1])
        outs, hs, poss = [], [], []
        for i in range(2):
            W, b, A, B = proj[i]
            lora = (A, B, cfg[i][0]) if A is not None else None
            y, h, pos = _lora_fwd(x2, W, b, lora, cfg[i][1], seeds[i])
            outs.append(y)
            hs.append(h)
            poss.append(pos)
        g, u = outs
        a = _act_fwd(kind, g, out=_scratch.get("mlp_a", g.shape, g.dtype, g.device)).mul_(u)
        W, b, A, B = proj[2]
        lora = (A, B, cfg[2][0]) if A is not None else None
        y, hd, pos = _lora_fwd(a, W, b, lora, cfg[2][1], seeds[2])
        del a
        hs.append(hd)
        poss.append(pos)
        ctx.save_for_backward(*_x_saved(ctx, x, src), g, u, *hs, *poss, *tensors)
        ctx.meta = (kind, cfg, seeds, x.shape)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        kind, cfg, seeds, shape = ctx.meta
        saved = ctx.saved_tensors
        g, u = saved[3:5]
        hs = saved[5:8]
        poss = saved[8:11]
        tensors = saved[11:]
        proj = [tensors[4 * i: 4 * i + 4] for i in range(3)]
        grads = [None] * 12
        dy2 = dy.reshape(-1, dy.shape[-1])

        def lora_of(i):
            W, b, A, B = proj[i]
            return (A, B, cfg[i][0]) if A is not None else None

        act_g = _act_fwd(kind, g, out=_scratch.get("mlp_act", g.shape, g.dtype, g.device))
        a = torch.mul(act_g, u, out=_scratch.get("mlp_a", g.shape, g.dtype, g.device))
        da, grads[10], grads[11] = _lora_bwd(dy2, a, proj[2][0], lora_of(2), hs[2], cfg[2][1], seeds[2], True,
                                             poss[2])
        del a
        # dg = act'(g) * (da * u), du = da * act(g): one fresh tensor each, da reused in place
        du = da * act_g
        dg = _act_bwd(kind, da.mul_(u), g)
        del da
        need_dx = ctx.needs_input_grad[0]
        x2 = _x_restored(ctx, *saved[:3]).reshape(-1, shape[-1])
        dx = None
        for i, dz in ((0, dg), (1, du)):
            dxi, grads[4 * i + 2], grads[4 * i + 3] = _lora_bwd(
                dz, x2, proj[i][0], lora_of(i), hs[i], cfg[i][1], seeds[i], need_dx, poss[i])
            if dxi is not None:
                dx = dxi if dx is None else dx.add_(dxi)
        if dx is not None:
            dx = dx.view(shape)
        return (dx, None, None, None, *grads)


@torch.no_grad()
def _norm_rstd(x, eps: float) -> torch.Tensor:
    xf = x if x.dtype == torch.float32 else x.float()
    sq = torch.square(xf, out=_scratch.get("norm", xf.shape, torch.float32, xf.device))
    return torch.rsqrt(sq.mean(-1, keepdim=True).add_(eps))


def _norm_apply(x, rstd, w, gemma: bool) -> torch.Tensor:
    """RMSNorm's output from its input and ``rstd``: the forward's formula, also used to
    recompute a norm output in a backward (same ops, so the same bits)."""
    xf = x if x.dtype == torch.float32 else x.float()
    if gemma:
        return (xf * rstd).mul_(1.0 + w.float()).to(x.dtype)
    if x.dtype == torch.float32:
        y = torch.mul(xf, rstd)
        return y.mul_(w) if w.dtype == torch.float32 else w * y
    return w * torch.mul(xf, rstd, out=_scratch.get("norm", xf.shape, torch.float32, xf.device)).to(x.dtype)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a frozen weight: saves the input and ``rstd`` (as transformers' does) but
    makes one full-size temporary instead of three. ``gemma``: ``(x_hat * (1 + w)).to(dtype)``
    (Gemma / Gemma2), else ``w * x_hat.to(dtype)`` (Llama, Mistral, Qwen2/3, Phi3).

    The projections that consume its output (:class:`_LoraLinearFn`, :class:`_GatedMLPFn`)
    save this node's input and ``rstd`` instead of the output and recompute it in their
    backward (:func:`_norm_source`): the output itself is never kept."""

    @staticmethod
    def forward(ctx, x, w, eps, gemma):
        rstd = _norm_rstd(x, eps)
        y = _norm_apply(x, rstd, w, gemma)
        ctx.save_for_backward(x, rstd, w)
        ctx.gemma = gemma
        ctx.out_version = y._version  # a later in-place change of the output shows here
        # Weak references for _norm_source: reading ctx.saved_tensors during the forward would
        # make non-reentrant checkpointing recompute the whole region there and then. Under
        # checkpointing nothing keeps rstd, so _norm_source recomputes it (the same bits):
        # the link, hence what the consumers save, is the same in the forward and the recompute.
        ctx.src = (weakref.ref(x), weakref.ref(rstd), weakref.ref(w), eps)
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


def make_rms_norm_forward(norm, cpu_only: bool = False):
    """An instance ``forward`` running :class:`_RMSNormFn` in training with a frozen weight."""
    orig = type(norm).forward
    eps_attr, gemma = _NORMS[type(norm).__name__]

    def forward(self, x):
        if _fast_ok(x, cpu_only) and torch.is_grad_enabled() and not self.weight.requires_grad and x.requires_grad:
            return _RMSNormFn.apply(x, self.weight, float(getattr(self, eps_attr)), gemma)
        return orig(self, x)

    forward._llm2vec_fast_fused = True
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


def _fast_ok(x: torch.Tensor, cpu_only: bool = False) -> bool:
    """The device and autocast allow the fused functions (grad mode is the caller's test:
    with dropout they run without grad too, see :func:`_use_fused`). Not inside
    torch.compile: the functions write into module-level scratch buffers, which Dynamo cannot
    trace (the modules' own forwards compile)."""
    return (not (cpu_only and x.device.type != "cpu") and not torch.is_autocast_enabled(x.device.type)
            and not torch.compiler.is_compiling())


def _use_fused(dropout: bool) -> bool:
    """Autograd records (the memory saving), or a LoRA dropout is active: then the fused
    functions run without grad too, so both passes of GradCache and of reentrant
    checkpointing (the first without grad, the replay with) draw the same masks from the
    same seeds (peft's nn.Dropout in one pass and seeded masks in the other did not)."""
    return torch.is_grad_enabled() or dropout


def _skipped(module, itself: bool) -> list:
    """The modules whose ``__call__`` a fused path skips when it stands in for ``module``'s
    forward: a LoRA ``Linear``'s base layer, A, B and dropout (and the LoRA module itself when
    a fused MLP reads it), a plain ``nn.Linear`` itself."""
    if not hasattr(module, "base_layer"):
        return [module] if itself else []
    subs = [module.base_layer, *module.lora_A.values(), *module.lora_B.values(), *module.lora_dropout.values()]
    return [module, *subs] if itself else subs


def _hooked(mods) -> bool:
    """A hook would run on one of ``mods`` (or on every module): the fused paths read their
    weights without calling them, so they leave the work to the modules' own forwards."""
    from torch.nn.modules import module as mm

    if (mm._global_forward_hooks or mm._global_forward_pre_hooks or mm._global_backward_hooks
            or mm._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in mods)


def _fast_lora_forward(self, x, *args, _cpu_only: bool = False, **kwargs):
    """Instance ``forward`` of a peft LoRA ``Linear``: :class:`_LoraLinearFn` when it applies."""
    parts = None if (args or kwargs or not _fast_ok(x, _cpu_only) or _hooked(_skipped(self, False))) else lora_parts(self)
    if parts is None or parts[2] is None or x.dtype != parts[0].dtype or not _use_fused(parts[5] > 0):
        return type(self).forward(self, x, *args, **kwargs)
    W, b, A, B, s, p = parts
    seed = new_seed() if p > 0 else None
    return _LoraLinearFn.apply(x, W, b, A, B, s, p, seed, _norm_source(x))


def make_gated_mlp_forward(mlp, kind: str, cpu_only: bool = False):
    """An instance ``forward`` for a gated MLP (``gate_proj`` / ``up_proj`` / ``down_proj``)."""
    orig = type(mlp).forward

    def forward(self, x):
        if _fast_ok(x, cpu_only) and not _hooked([self.act_fn] + [m for n in ("gate_proj", "up_proj", "down_proj")
                                                                   for m in _skipped(getattr(self, n), True)]):
            parts = [lora_parts(getattr(self, n)) for n in ("gate_proj", "up_proj", "down_proj")]
            if all(pt is not None for pt in parts) and all(pt[0].dtype == x.dtype for pt in parts) \
                    and any(pt[2] is not None for pt in parts) and _use_fused(any(pt[5] > 0 for pt in parts)):
                cfg = tuple((pt[4], pt[5]) for pt in parts)
                tensors = [t for pt in parts for t in pt[:4]]
                return _GatedMLPFn.apply(x, kind, cfg, _norm_source(x), *tensors)
        return orig(self, x)

    forward._llm2vec_fast_fused = True
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

    def __init__(self, hf, cpu_only: bool = False):
        # cpu_only (patch_model's fuse_lora="auto"): CUDA inputs take peft's own forwards
        self.cpu_only = cpu_only
        self._root = weakref.ref(hf)  # remove() also finds copies peft made of patched modules
        self.modules_patched: list[torch.nn.Module] = []  # MLPs and norms
        self.slots: list[tuple[torch.nn.Module, str]] = []
        self.installed: list[torch.nn.Module] = []
        for m in hf.modules():
            kind = gated_mlp_kind(m)
            if kind is not None and "forward" not in m.__dict__:
                m.forward = make_gated_mlp_forward(m, kind, cpu_only)
                self.modules_patched.append(m)
            if type(m).__name__ in _NORMS and "forward" not in m.__dict__ and hasattr(m, "weight"):
                m.forward = make_rms_norm_forward(m, cpu_only)
                self.modules_patched.append(m)
            for n in _LINEAR_NAMES:
                if isinstance(getattr(m, n, None), torch.nn.Module):
                    self.slots.append((m, n))
        self.sync()

    def __deepcopy__(self, memo):
        """A deep copy of the patched model gets its own state whose root is the copy (a copy
        of the weak reference still named the original, whose fused forwards the copy's
        unpatch then removed)."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        root = self._root()
        for k, v in self.__dict__.items():
            if k != "_root":
                setattr(new, k, copy.deepcopy(v, memo))
        new_root = memo.get(id(root), root) if root is not None else None
        new._root = weakref.ref(new_root) if new_root is not None else self._root
        return new

    def __reduce__(self):
        from .patch import NOT_PICKLABLE

        raise TypeError(NOT_PICKLABLE)

    def sync(self):
        for parent, name in self.slots:
            child = getattr(parent, name)
            if "forward" not in child.__dict__ and hasattr(child, "lora_A") and hasattr(child, "base_layer"):
                fwd = functools.partial(_fast_lora_forward, _cpu_only=True) if self.cpu_only else _fast_lora_forward
                fwd._llm2vec_fast_fused = True
                child.forward = types.MethodType(fwd, child)
                self.installed.append(child)

    def remove(self):
        for m in self.modules_patched + self.installed:
            m.__dict__.pop("forward", None)
        root = self._root()
        if root is not None:  # copies of patched modules (peft's modules_to_save deep-copies them)
            for m in root.modules():
                if getattr(getattr(m.__dict__.get("forward"), "__func__", None), "_llm2vec_fast_fused", False):
                    del m.__dict__["forward"]
        self.modules_patched, self.installed = [], []

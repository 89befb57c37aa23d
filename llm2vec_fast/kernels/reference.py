"""Pure-PyTorch reference implementations: CPU fallback, test oracle and benchmark baseline.

One implementation serves all three roles, so every kernel is judged against
exactly what runs when no kernel can. Nothing here imports triton.

Shape letters: ``B`` batch, ``S``/``T`` tokens per sequence, ``H`` query heads,
``Hkv`` key/value heads (``H % Hkv == 0``, ``G = H // Hkv`` query heads share one
K/V head: query head ``h`` reads K/V head ``h // G``, flash-attn's convention),
``D`` head dim, ``N`` selected (labelled) rows, ``C`` hidden size, ``V`` vocabulary.

``upcast=True`` computes in fp32 (fp64 inputs stay fp64) and returns the input
dtype; ``upcast=False`` computes in the input dtype, which is how the tests
measure the reference's own rounding error (STYLE.md's tolerance rule).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    return torch.float32 if upcast else dtype


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------


def _scores_softmax(s: torch.Tensor, softcap: float, dropout_p: float, training_dropout: bool):
    if softcap and softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    if dropout_p > 0 and training_dropout:
        p = F.dropout(p, p=dropout_p, training=True)
    return p, lse


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    upcast: bool = True,
    return_lse: bool = False,
):
    """Non-causal attention over packed sequences, one sequence at a time.

    q ``(total_q, H, D)``, k/v ``(total_k, Hkv, D)``, cu_seqlens ``(B+1,)`` int32.
    Returns out ``(total_q, H, D)`` in q's dtype and, with ``return_lse``, the
    log-sum-exp ``(H, total_q)`` fp32 (``-inf`` for a query whose sequence has no key;
    its output row is 0). GQA is computed by grouping query heads, never by
    repeating K/V.
    """
    total_q, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cdt = _compute_dtype(q.dtype, upcast)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs = q[cq[b] : cq[b + 1]].to(cdt)
        ks = k[ck[b] : ck[b + 1]].to(cdt)
        vs = v[ck[b] : ck[b + 1]].to(cdt)
        sq, sk = qs.shape[0], ks.shape[0]
        if sq == 0:
            continue
        if sk == 0:
            outs.append(qs.new_zeros(sq, H, D))
            lses.append(torch.full((H, sq), float("-inf"), device=q.device, dtype=torch.float32))
            continue
        qh = qs.permute(1, 0, 2).reshape(Hkv, G, sq, D)
        kh = ks.permute(1, 0, 2)
        vh = vs.permute(1, 0, 2)
        s = torch.einsum("kgqd,ksd->kgqs", qh, kh) * scale
        p, lse = _scores_softmax(s, softcap, dropout_p, True)
        o = torch.einsum("kgqs,ksd->kgqd", p, vh)
        outs.append(o.reshape(H, sq, D).permute(1, 0, 2))
        lses.append(lse.reshape(H, sq).float())
    if outs:
        out = torch.cat(outs, 0).to(q.dtype)
        lse = torch.cat(lses, 1)
    else:
        out = q.new_zeros(q.shape)
        lse = torch.full((H, 0), float("-inf"), device=q.device)
    return (out, lse) if return_lse else out


def attention_padded_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    upcast: bool = True,
    return_lse: bool = False,
):
    """Non-causal attention over a padded batch with a key padding mask.

    q ``(B, S, H, D)``, k/v ``(B, S, Hkv, D)``, key_padding_mask ``(B, S)`` bool, True =
    valid (None = all valid). Padded query rows, and every row of a sequence with no
    valid token, give 0 (log-sum-exp ``-inf``), never NaN. Returns out ``(B, S, H, D)``
    and, with ``return_lse``, lse ``(B, H, S)`` fp32.
    """
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cdt = _compute_dtype(q.dtype, upcast)
    qh = q.to(cdt).permute(0, 2, 1, 3).reshape(B, Hkv, G, S, D)
    kh = k.to(cdt).permute(0, 2, 1, 3)
    vh = v.to(cdt).permute(0, 2, 1, 3)
    s = torch.einsum("bkgqd,bksd->bkgqs", qh, kh) * scale
    if softcap and softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if key_padding_mask is not None:
        m = key_padding_mask.to(torch.bool)
        # A sequence with no valid key would give an all -inf row (NaN softmax):
        # let it see every key instead and zero its rows below.
        m = m | ~m.any(dim=-1, keepdim=True)
        s = s.masked_fill(~m[:, None, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    if dropout_p > 0:
        p = F.dropout(p, p=dropout_p, training=True)
    o = torch.einsum("bkgqs,bksd->bkgqd", p, vh).reshape(B, H, S, D)
    lse = lse.reshape(B, H, S).float()
    if key_padding_mask is not None:
        qvalid = key_padding_mask.to(torch.bool)[:, None, :]
        o = o * qvalid[..., None].to(o.dtype)
        lse = lse.masked_fill(~qvalid, float("-inf"))
    out = o.permute(0, 2, 1, 3).to(q.dtype)
    return (out, lse) if return_lse else out


def attention_padded_sdpa(q, k, v, key_padding_mask=None, softmax_scale=None, dropout_p=0.0):
    """The CPU fast path of the torch backend: SDPA with a boolean padding mask.

    Same contract as :func:`attention_padded_ref` without softcap or lse; GQA through
    SDPA's ``enable_gqa`` (no repeated K/V). Checked against the reference in tests.
    """
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    mask = None
    if key_padding_mask is not None:
        m = key_padding_mask.to(torch.bool)
        m = m | ~m.any(dim=-1, keepdim=True)
        mask = m[:, None, None, :]
    o = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale, enable_gqa=(H != Hkv)
    )
    o = o.transpose(1, 2)
    if key_padding_mask is not None:
        o = o * key_padding_mask.to(o.dtype)[:, :, None, None]
    return o


# --------------------------------------------------------------------------------------
# Masked linear cross-entropy
# --------------------------------------------------------------------------------------


def mask_spans(mask: torch.Tensor):
    """Per row of a ``(B, S)`` key padding mask: ``lo``, ``hi`` (int64, the span ``[lo, hi)`` of
    its True entries, ``[0, 0)`` for a row with none) and ``holes`` (bool, a False entry inside
    the span; left / right padding has none). On the mask's device, no host sync."""
    m = mask.to(torch.int32)
    S = m.shape[1]
    anyv = m.any(dim=1) if S else torch.zeros(m.shape[0], dtype=torch.bool, device=m.device)
    if S:
        lo = torch.where(anyv, m.argmax(dim=1), 0)
        hi = torch.where(anyv, S - m.flip(1).argmax(dim=1), 0)
    else:
        lo = hi = torch.zeros(m.shape[0], dtype=torch.int64, device=m.device)
    holes = m.sum(dim=1) != hi - lo
    return lo, hi, holes


def labelled_rows(hidden: torch.Tensor, labels: torch.Tensor, shift: int, ignore_index: int, vocab: int | None = None,
                  count: int | None = None):
    """Where the labelled rows are, without gathering them.

    hidden ``(B, T, C)`` or ``(N, C)``; labels ``(B, T)`` or ``(N,)``. With ``shift=s`` the
    label at position t is predicted by the hidden state at t - s (per sequence for 3-d
    input; along the single sequence for 2-d input). Returns ``(flat_h, h_index, y_sel,
    index, shape)``: ``flat_h`` every row of hidden as ``(rows, C)`` (a view of a contiguous
    hidden: the shift is applied to the indices, never by slicing hidden, whose flattening
    copies all of it and whose backward pads a second full-size gradient), ``h_index`` the
    labelled rows of ``flat_h``, ``y_sel`` their labels, ``index`` their positions in the
    flattened shifted label grid and ``shape`` that grid's shape.

    ``vocab``: also check that every label the shift keeps lies in ``[0, vocab)`` (or is
    ``ignore_index``), raising ``ValueError`` otherwise, within the same host sync.
    ``torch.nonzero`` here is the one host synchronisation of the op (the number of
    labelled rows decides every later shape).

    ``count``: the number of labelled rows when the caller knows it on the host (the MNTP
    collator counts them as it draws them): then nothing syncs. ``torch.nonzero_static``
    finds the rows at that size, and device-side assertions (``torch._assert_async``) check
    the count and, with ``vocab``, the labels' range: a RuntimeError at once on the CPU; on
    a GPU the assertion stops the device before a later kernel reads a row, and the error
    surfaces at the next sync.
    """
    rows = None
    if shift:
        if hidden.dim() == 3:
            labels = labels[:, shift:]
            rows = max(hidden.shape[1] - shift, 1)  # shifted position (b, t) reads hidden row b * T + t
        else:
            labels = labels[shift:]  # shifted position t reads hidden row t
    shape = labels.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    keep = flat_y != ignore_index
    if count is not None:
        index = torch.nonzero_static(keep, size=count).squeeze(1)
        torch._assert_async(keep.sum() == count, f"num_labelled: {count} given, but a different number of labels "
                                                 f"the shift keeps are not ignore_index={ignore_index}")
        if vocab is not None:
            torch._assert_async(~(keep & ((flat_y < 0) | (flat_y >= vocab))).any(),
                                f"labels: expected values in [0, {vocab}) or ignore_index={ignore_index}")
    elif vocab is None:
        index = torch.nonzero(keep).squeeze(1)
    else:
        # The range check rides on nonzero's own sync: a bad label appends n + 1 more nonzero
        # entries, so the count (which nonzero must bring to the host anyway) tells.
        n = keep.numel()
        bad = keep & ((flat_y < 0) | (flat_y >= vocab))
        index = torch.nonzero(torch.cat([keep, bad.any().expand(n + 1)])).squeeze(1)
        if index.shape[0] > n:
            first = flat_y[bad][0].item()
            raise ValueError(f"labels: expected values in [0, {vocab}) or ignore_index={ignore_index}, found {first}")
    h_index = index if rows is None else index + torch.div(index, rows, rounding_mode="floor") * shift
    return flat_h, h_index, flat_y.index_select(0, index), index, shape


def select_labelled_rows(hidden: torch.Tensor, labels: torch.Tensor, shift: int, ignore_index: int,
                         vocab: int | None = None, count: int | None = None):
    """Apply the shift and gather the rows that carry a label (see :func:`labelled_rows`,
    which also checks the labels against ``vocab`` when given).

    Returns ``(h_sel (N, C), y_sel (N,), index (N,) into the flattened shifted label grid,
    shifted label shape)``. Differentiable in hidden (its backward is one full-size zero
    gradient with the rows added in).
    """
    flat_h, h_index, y_sel, index, shape = labelled_rows(hidden, labels, shift, ignore_index, vocab, count)
    return flat_h.index_select(0, h_index), y_sel, index, shape


def _block_logits(h, w_block, b_block, softcap):
    """fp32 (or fp64) logits of one vocabulary block, softcapped when asked."""
    z = h @ w_block.t()
    if b_block is not None:
        z = z + b_block
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z


def row_loss(lse, zy, zsum, V: int, label_smoothing: float, z_loss: float):
    """Per-row loss from a row's log-sum-exp, target logit and (with label smoothing) the sum of
    its logits: ``(1 - eps) (lse - z_y) + eps (lse - sum(z) / V) + z_loss lse^2``."""
    loss = (lse - zy) * (1.0 - label_smoothing)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - zsum / V)
    if z_loss:
        loss = loss + z_loss * lse * lse
    return loss


MCE_STRATEGIES = ("auto", "eager", "two_pass")


def eager_allowed(strategy: str, need_wb: bool, uniform_g: bool) -> bool:
    """Whether a masked-CE call that needs gradients may compute them in its forward.

    The eager strategy materialises a chunk of full-vocabulary logits and turns it into the
    gradients of ``sum(loss)`` at once, saving the backward's recomputation of the logits
    (one GEMM of ``N x C x V`` of three or four). d hidden scales row by row with any
    upstream gradient; d weight / d bias sum over rows, so they need one upstream factor
    for all rows (reductions ``mean`` / ``sum``). ``strategy="eager"`` where that does not
    hold raises ``ValueError``; ``"two_pass"`` never allows it.
    """
    if strategy == "two_pass":
        return False
    if need_wb and not uniform_g:
        if strategy == "eager":
            raise ValueError(
                "strategy: 'eager' computes d weight / d bias in the forward and needs reduction 'mean' or "
                "'sum' (one upstream factor for all rows); use 'two_pass' or 'auto' with reduction='none'"
            )
        return False
    return True


def _eager_linear_ce(h, w, b, y, softcap, label_smoothing, z_loss, rows, chunk_vocab, cdt, need_h, need_w, need_b):
    """Per-row loss, lse, correctness and the gradients of ``sum(loss)``, chunk of rows by chunk.

    Each chunk of ``rows`` rows holds its ``(rows, V)`` logits (in ``cdt``), built and used
    ``chunk_vocab`` columns at a time, and turns them into ``dz`` in place.
    """
    N, V = h.shape[0], w.shape[0]
    dev = h.device
    loss_all = torch.empty(N, device=dev, dtype=cdt)
    lse_all = torch.empty(N, device=dev, dtype=cdt)
    correct = torch.empty(N, device=dev, dtype=torch.bool)
    dh = torch.empty(h.shape, device=dev, dtype=cdt) if need_h else None
    dw = torch.zeros(w.shape, device=dev, dtype=cdt) if need_w else None
    db = torch.zeros(V, device=dev, dtype=cdt) if need_b else None
    blocks = [(v0, min(V, v0 + chunk_vocab)) for v0 in range(0, V, chunk_vocab)]
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        hc = h[r0:r1].to(cdt)
        yc = y[r0:r1]
        z = torch.empty((r1 - r0, V), device=dev, dtype=cdt)
        for v0, v1 in blocks:
            z[:, v0:v1] = _block_logits(hc, w[v0:v1].to(cdt), None if b is None else b[v0:v1].to(cdt), softcap)
        lse = torch.logsumexp(z, dim=1)
        zy = z.gather(1, yc[:, None].long())[:, 0]
        loss_all[r0:r1] = row_loss(lse, zy, z.sum(1) if label_smoothing else None, V, label_smoothing, z_loss)
        lse_all[r0:r1] = lse
        correct[r0:r1] = z.argmax(1) == yc
        if not (need_h or need_w or need_b):
            continue
        dcap = 1.0 - (z / softcap) ** 2 if softcap else None
        dz = z.sub_(lse[:, None]).exp_()
        if z_loss:
            dz.mul_((1.0 + 2.0 * z_loss * lse)[:, None])
        if label_smoothing:
            dz.sub_(label_smoothing / V)
        dz[torch.arange(r1 - r0, device=dev), yc.long()] -= 1.0 - label_smoothing
        if dcap is not None:
            dz.mul_(dcap)
        if need_h:
            dh[r0:r1] = 0
        for v0, v1 in blocks:
            dzb = dz[:, v0:v1]
            if need_h:
                dh[r0:r1] += dzb @ w[v0:v1].to(cdt)
            if need_w:
                dw[v0:v1] += dzb.t() @ hc
        if need_b:
            db += dz.sum(0)
    return loss_all, lse_all, correct, dh, dw, db


def autocast_off(device: torch.device):
    """A context with autocast off for ``device``'s type; nothing when it is off already."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def without_autocast(fn):
    """For an autograd Function's ``forward(ctx, x, ...)`` / ``backward(ctx, g, ...)``: run it
    with autocast off for the device of its first tensor. Under ``torch.autocast`` (HF
    Trainer's ``bf16=True``) the op's own matmuls would otherwise be lowered to the autocast
    dtype: fp32 logits computed in 16 bits, and GEMMs into given fp32 buffers failing on the
    dtype of ``out``. The op computes in the dtypes it chose for its inputs, whatever the
    caller's autocast state; what its inputs are is the caller's business."""

    @functools.wraps(fn)
    def wrapper(ctx, x, *args):
        with autocast_off(x.device):
            return fn(ctx, x, *args)

    return wrapper


class ChunkedLinearCE(torch.autograd.Function):
    """Cross-entropy of ``h @ w.T + b`` over the vocabulary, in blocks.

    Never holds more than ``chunk_rows x chunk_vocab`` logits (twice that with a softcap
    in the eager strategy). Two-pass (``eager=False``): the forward keeps an online
    log-sum-exp, the target logit and the argmax; the backward recomputes each block.
    Eager: the forward holds whole rows of logits, ``chunk_rows * chunk_vocab // V`` at a
    time, and computes the gradients of ``sum(loss)`` there (see :func:`eager_allowed`);
    the backward only scales them. Returns the loss in fp32 (fp64 for fp64 inputs; 0-d for
    ``mean`` / ``sum``, per row ``(N,)`` for ``none``) and per-row correctness ``(N,)`` bool.
    """

    @staticmethod
    @without_autocast
    def forward(ctx, h, w, b, y, softcap, label_smoothing, z_loss, chunk_rows, chunk_vocab, cdt, reduction, eager):
        N, V = h.shape[0], w.shape[0]
        dev = h.device
        ctx.cfg = (softcap, label_smoothing, z_loss, chunk_rows, chunk_vocab, cdt, reduction)
        ctx.eager = None
        if eager:
            need_b = ctx.needs_input_grad[2] and b is not None
            loss_all, lse_all, correct, dh, dw, db = _eager_linear_ce(
                h, w, b, y, softcap, label_smoothing, z_loss, max(1, chunk_rows * chunk_vocab // V), chunk_vocab, cdt,
                ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_b,
            )
            ctx.eager = (dh, dw, db)
            ctx.save_for_backward(h, w, b, y, lse_all)
            ctx.mark_non_differentiable(correct)
            return _reduce_rows(loss_all, reduction), correct
        lse_all = torch.empty(N, device=dev, dtype=cdt)
        loss_all = torch.empty(N, device=dev, dtype=cdt)
        correct = torch.empty(N, device=dev, dtype=torch.bool)
        for r0 in range(0, N, chunk_rows):
            r1 = min(N, r0 + chunk_rows)
            hc = h[r0:r1].to(cdt)
            yc = y[r0:r1]
            lse = torch.full((r1 - r0,), float("-inf"), device=dev, dtype=cdt)
            zy = torch.zeros(r1 - r0, device=dev, dtype=cdt)
            zsum = torch.zeros(r1 - r0, device=dev, dtype=cdt)
            best = torch.full((r1 - r0,), float("-inf"), device=dev, dtype=cdt)
            arg = torch.zeros(r1 - r0, device=dev, dtype=torch.long)
            for v0 in range(0, V, chunk_vocab):
                v1 = min(V, v0 + chunk_vocab)
                bv = None if b is None else b[v0:v1].to(cdt)
                z = _block_logits(hc, w[v0:v1].to(cdt), bv, softcap)
                lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
                inb = (yc >= v0) & (yc < v1)
                zy = zy + torch.where(inb, z.gather(1, (yc - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
                if label_smoothing:
                    zsum = zsum + z.sum(1)
                bm, bi = z.max(dim=1)
                upd = bm > best
                best = torch.where(upd, bm, best)
                arg = torch.where(upd, bi + v0, arg)
            lse_all[r0:r1] = lse
            loss_all[r0:r1] = row_loss(lse, zy, zsum, V, label_smoothing, z_loss)
            correct[r0:r1] = arg == yc
        ctx.save_for_backward(h, w, b, y, lse_all)
        ctx.mark_non_differentiable(correct)
        return _reduce_rows(loss_all, reduction), correct

    @staticmethod
    @without_autocast
    def backward(ctx, g, _gc):
        h, w, b, y, lse_all = ctx.saved_tensors
        softcap, eps, z_loss, chunk_rows, chunk_vocab, cdt, reduction = ctx.cfg
        N, V = h.shape[0], w.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        none = (None,) * 9
        g = g.to(cdt)
        if reduction == "mean":
            g = g / N
        if ctx.eager is not None:
            # The forward's gradients of sum(loss), scaled once and handed over; a second
            # backward (retain_graph) recomputes below.
            dh, dw, db = ctx.eager
            ctx.eager = None
            gr = g[:, None] if g.dim() else g
            return (
                dh.mul_(gr).to(h.dtype) if need_h and dh is not None else None,
                dw.mul_(g).to(w.dtype) if need_w and dw is not None else None,
                db.mul_(g).to(b.dtype) if need_b and db is not None else None,
            ) + none
        if g.dim() == 0:
            g = g.expand(N)
        dh = torch.zeros(h.shape, device=h.device, dtype=cdt) if need_h else None
        dw = torch.zeros(w.shape, device=w.device, dtype=cdt) if need_w else None
        db = torch.zeros(V, device=w.device, dtype=cdt) if (need_b and b is not None) else None
        for r0 in range(0, N, chunk_rows):
            r1 = min(N, r0 + chunk_rows)
            hc = h[r0:r1].to(cdt)
            yc = y[r0:r1]
            lse = lse_all[r0:r1]
            gr = g[r0:r1]
            coef = gr * (1.0 + 2.0 * z_loss * lse) if z_loss else gr
            for v0 in range(0, V, chunk_vocab):
                v1 = min(V, v0 + chunk_vocab)
                wv = w[v0:v1].to(cdt)
                z = _block_logits(hc, wv, None if b is None else b[v0:v1].to(cdt), softcap)
                dz = torch.exp(z - lse[:, None]) * coef[:, None]
                if eps:
                    dz = dz - (eps / V) * gr[:, None]
                # the target's -(1 - eps) g on the rows whose label lies in this block (no sync)
                inb = (yc >= v0) & (yc < v1)
                col = (yc - v0).clamp(0, v1 - v0 - 1)[:, None]
                dz.scatter_add_(1, col, torch.where(inb, -(1.0 - eps) * gr, 0.0)[:, None].to(dz.dtype))
                if softcap:
                    dz = dz * (1.0 - (z / softcap) ** 2)
                if need_h:
                    dh[r0:r1] += dz @ wv
                if need_w:
                    dw[v0:v1] += dz.t() @ hc
                if db is not None:
                    db[v0:v1] += dz.sum(0)
        return (
            dh.to(h.dtype) if dh is not None else None,
            dw.to(w.dtype) if dw is not None else None,
            db.to(b.dtype) if db is not None else None,
        ) + none


def _reduce_rows(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    """mean / sum / none of per-row losses, summed in fp32 (fp64 stays fp64)."""
    per_row = per_row.to(torch.float64 if per_row.dtype == torch.float64 else torch.float32)
    if reduction == "mean":
        return per_row.sum() / per_row.shape[0]
    if reduction == "sum":
        return per_row.sum()
    return per_row


def all_ignored_loss(hidden, weight, bias, shape, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """The loss of a call with no labelled row: 0 (0-d for ``mean`` / ``sum``, zeros of the
    shifted label ``shape`` for ``none``) in ``dtype``, never NaN.

    Built from zero-size slices of hidden, weight and bias (never their values: a NaN / inf
    in an ignored row, or a 16-bit sum that overflows, cannot reach it), so the graph stays
    connected and the backward gives every input that requires grad an exact-zero gradient
    of its own shape and dtype.
    """
    zero = hidden[..., :0].sum() + weight[:0].sum()
    if bias is not None:
        zero = zero + bias[:0].sum()
    zero = zero.to(dtype)
    if reduction == "none":
        return zero + torch.zeros(shape, device=hidden.device, dtype=dtype)
    return zero


def masked_linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    shift: int = 1,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_accuracy: bool = False,
    chunk_rows: int = 2048,
    chunk_vocab: int = 8192,
    upcast: bool = True,
    strategy: str = "auto",
    num_labelled: int | None = None,
):
    """Chunked reference of :func:`llm2vec_fast.masked_linear_cross_entropy` (same contract).

    Only labelled rows reach the LM head; at most ``chunk_rows x chunk_vocab`` logits
    exist at once (twice that with a softcap when eager). ``strategy``: ``"two_pass"``
    recomputes the logits in the backward; ``"eager"`` computes the gradients in the
    forward from whole rows of logits (one GEMM fewer; see :func:`eager_allowed`);
    ``"auto"`` is eager whenever gradients are wanted and it is allowed.
    """
    h_sel, y_sel, index, shape = select_labelled_rows(hidden, labels, shift, ignore_index, weight.shape[0],
                                                      num_labelled)
    cdt = _compute_dtype(hidden.dtype, upcast)
    n = h_sel.shape[0]
    out_dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if n == 0:
        loss = all_ignored_loss(hidden, weight, bias, shape, reduction, out_dt)
        acc = torch.zeros((), device=hidden.device)
        return (loss, acc) if return_accuracy else loss
    need_wb = weight.requires_grad or (bias is not None and bias.requires_grad)
    eager = (
        torch.is_grad_enabled() and (hidden.requires_grad or need_wb)
        and eager_allowed(strategy, need_wb, reduction != "none")
    )
    loss, correct = ChunkedLinearCE.apply(
        h_sel, weight, bias, y_sel, softcap or 0.0, float(label_smoothing), float(z_loss),
        chunk_rows, chunk_vocab, cdt, reduction, eager,
    )
    loss = loss.to(out_dt)
    if reduction == "none":
        full = torch.zeros(shape.numel(), device=hidden.device, dtype=out_dt)
        loss = full.index_put((index,), loss).reshape(shape)
    if return_accuracy:
        return loss, correct.float().mean()
    return loss


# --------------------------------------------------------------------------------------
# Pooling and InfoNCE
# --------------------------------------------------------------------------------------

POOLING_MODES = ("mean", "weighted_mean", "last_token", "eos_token", "bos_token")


def pooling_weights(region: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-token pooling weights ``(B, T)`` fp32 from the pooled region ``(B, T)`` bool.

    mean: 1 on the region; weighted_mean: 1..n along the region (later tokens weigh
    more); last_token / eos_token: 1 on the region's last token; bos_token: 1 on its
    first token. A row with an empty region gets all-zero weights.
    """
    r = region.to(torch.float32)
    if mode == "mean":
        return r
    rank = torch.cumsum(r, dim=1) * r  # 1..n on the region, 0 elsewhere
    if mode == "weighted_mean":
        return rank
    if mode in ("last_token", "eos_token"):
        n = r.sum(dim=1, keepdim=True)
        return ((rank == n) & region).to(torch.float32)
    if mode == "bos_token":
        return ((rank == 1) & region).to(torch.float32)
    raise ValueError(f"mode: expected one of {list(POOLING_MODES)}, got {mode!r}")


def packed_to_padded_mask(cu_seqlens: torch.Tensor, total: int):
    """``(B, Tmax)`` token index grid and validity mask for packed sequences."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    tmax = int(lens.max()) if lens.numel() else 0
    ar = torch.arange(tmax, device=cu_seqlens.device)
    valid = ar[None, :] < lens[:, None]
    idx = (cu_seqlens[:-1].long()[:, None] + ar[None, :]).clamp(max=max(total - 1, 0))
    return idx, valid


def pool_ref(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    embed_mask: torch.Tensor | None = None,
    mode: str = "mean",
    cu_seqlens: torch.Tensor | None = None,
    upcast: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Masked pooling; returns ``(B, C)`` in ``out_dtype`` (default: hidden's dtype).

    Padded: hidden ``(B, T, C)``, attention_mask ``(B, T)`` (1/True = token), embed_mask
    ``(B, T)`` (1 = token belongs to the pooled text; instruction tokens 0). Packed:
    hidden ``(total, C)`` with ``cu_seqlens`` ``(B+1,)`` int32, attention_mask None,
    embed_mask ``(total,)``. The pooled region is attention_mask & embed_mask; an empty
    region pools to the zero vector (documented, never NaN). Tokens outside the region are
    selected out, not weighted by 0, so whatever they hold (NaN from a fully masked
    attention row, say) never reaches the result, and their gradient is 0.
    """
    cdt = _compute_dtype(hidden.dtype, upcast)
    if cu_seqlens is not None:
        idx, valid = packed_to_padded_mask(cu_seqlens, hidden.shape[0])
        region = valid
        if embed_mask is not None:
            region = region & embed_mask.to(torch.bool)[idx]
        w = pooling_weights(region, mode)
        h = hidden[idx]  # (B, Tmax, C)
    else:
        region = attention_mask.to(torch.bool)
        if embed_mask is not None:
            region = region & embed_mask.to(torch.bool)
        w = pooling_weights(region, mode)
        h = hidden
    h = torch.where(region[..., None], h.to(cdt), 0.0)
    with torch.autocast(hidden.device.type, enabled=False):  # sums in cdt under autocast too
        num = torch.einsum("bt,btc->bc", w.to(cdt), h)
    den = w.sum(dim=1, keepdim=True).clamp_min(1.0).to(cdt)
    return (num / den).to(out_dtype or hidden.dtype)


def all_gather_with_grad(x: torch.Tensor):
    """All-gather along dim 0 whose backward sums every rank's gradient into the local shard.

    Returns ``(gathered (world*B, ...), rank)``. Works with gloo and nccl.
    """
    import torch.distributed as dist

    return _AllGather.apply(x), dist.get_rank()


_WARNED_NO_GROUP: list = []


def _check_rows_match(n_rows: int, n_neg: int, device) -> None:
    """Every rank must gather as many rows as the others (all_gather's shapes): differing
    counts aborted a process inside gloo (NCCL may hang or mix rows); a ValueError on every
    rank instead, naming each rank's counts."""
    import torch.distributed as dist

    mine = torch.tensor([n_rows, n_neg], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    counts = [tuple(p.tolist()) for p in parts]
    if any(c != counts[0] for c in counts):
        raise ValueError("cross_rank: every rank must pass the same number of queries and of hard negatives, got "
                         + ", ".join(f"rank {r}: {b} queries, {m} negatives" for r, (b, m) in enumerate(counts)))


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def info_nce_ref(
    emb_q: torch.Tensor,
    emb_d: torch.Tensor,
    emb_neg: torch.Tensor | None = None,
    *,
    temperature: float = 0.05,
    symmetric: bool = False,
    cross_rank: bool = False,
) -> torch.Tensor:
    """InfoNCE on L2-normalised embeddings; returns the mean loss (0-d fp32).

    emb_q ``(B, C)``, emb_d ``(B, C)`` (row i is query i's positive), emb_neg ``(M, C)``
    hard negatives appended as extra columns. ``symmetric`` averages the query->document
    loss with the document->query loss (documents scored against the queries).
    ``cross_rank`` gathers documents (and negatives, and queries for the symmetric
    term) from every rank of an initialised ``torch.distributed`` group; gradients flow
    back to the local shard, summed over ranks.
    """
    up = (lambda t: t if t.dtype == torch.float64 else t.float())
    q = F.normalize(up(emb_q), dim=-1)
    d = F.normalize(up(emb_d), dim=-1)
    n = F.normalize(up(emb_neg), dim=-1) if emb_neg is not None else None
    offset = 0
    q_all, d_all, n_all = q, d, n
    if cross_rank:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            _check_rows_match(q.shape[0], 0 if n is None else n.shape[0], q.device)
            d_all, rank = all_gather_with_grad(d)
            if symmetric:  # (only the document->query term scores the gathered queries)
                q_all, _ = all_gather_with_grad(q)
            if n is not None:
                n_all, _ = all_gather_with_grad(n)
            offset = rank * q.shape[0]
        elif int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not _WARNED_NO_GROUP:
            _WARNED_NO_GROUP.append(True)
            warnings.warn("info_nce: cross_rank=True with WORLD_SIZE > 1 but no initialised torch.distributed "
                          "group: the loss uses this process's rows only", RuntimeWarning, stacklevel=3)
    cols = d_all if n_all is None else torch.cat([d_all, n_all], 0)
    labels = torch.arange(q.shape[0], device=q.device) + offset
    with torch.autocast(q.device.type, enabled=False):  # fp32 scores under autocast too
        loss = F.cross_entropy(q @ cols.t() / temperature, labels)
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(d @ q_all.t() / temperature, labels))
    return loss


def pooled_info_nce_ref(
    hidden_q, mask_q, hidden_d, mask_d, *, embed_mask_q=None, embed_mask_d=None,
    hidden_neg=None, mask_neg=None, embed_mask_neg=None, temperature=0.05, pooling="mean",
    symmetric=False, cross_rank=False, cu_seqlens_q=None, cu_seqlens_d=None, cu_seqlens_neg=None,
):
    """pool -> normalise -> similarity -> cross-entropy, the composition of the two references."""
    f32 = torch.float32 if hidden_q.dtype != torch.float64 else torch.float64
    eq = pool_ref(hidden_q, mask_q, embed_mask_q, pooling, cu_seqlens=cu_seqlens_q, out_dtype=f32)
    ed = pool_ref(hidden_d, mask_d, embed_mask_d, pooling, cu_seqlens=cu_seqlens_d, out_dtype=f32)
    en = None
    if hidden_neg is not None:
        en = pool_ref(hidden_neg, mask_neg, embed_mask_neg, pooling, cu_seqlens=cu_seqlens_neg, out_dtype=f32)
    return info_nce_ref(eq, ed, en, temperature=temperature, symmetric=symmetric, cross_rank=cross_rank)

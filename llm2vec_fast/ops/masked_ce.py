"""Masked next-token cross-entropy fused with the LM head (the MNTP loss without logits).

Shapes: ``B`` batch, ``T`` tokens, ``N`` labelled rows after the shift, ``C`` hidden
size, ``V`` vocabulary.
"""
from __future__ import annotations

import math
import numbers

import torch

from .._validation import check_choice, check_same, check_tensor
from ..kernels import reference as ref
from ._dispatch import resolve_backend, warn_once


def _real(x) -> bool:
    """A real Python / NumPy number (not a bool, a tensor or None)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _validate(hidden, weight, labels, bias, shift, ignore_index, reduction, softcap, label_smoothing, z_loss,
              strategy, num_labelled=None):
    check_tensor("hidden", hidden, ndims=(2, 3), float_=True)
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden: expected a hidden size C > 0 (the last dim), got shape {tuple(hidden.shape)}")
    check_tensor("weight", weight, ndims=2, float_=True)
    check_same("hidden", hidden, "weight", weight)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape (V, {hidden.shape[-1]}) (C = hidden's last dim), got {tuple(weight.shape)}")
    check_tensor("labels", labels)
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels: expected an int64 or int32 tensor, got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden without C), got {tuple(labels.shape)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels: expected device {hidden.device}, got {labels.device}")
    if bias is not None:
        check_tensor("bias", bias, ndims=1, float_=True)
        check_same("weight", weight, "bias", bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},) (V), got {tuple(bias.shape)}")
    T = hidden.shape[-2] if hidden.dim() == 3 else hidden.shape[0]
    if not isinstance(shift, int) or shift < 0 or (shift >= T and T > 0):
        raise ValueError(f"shift: expected an int in [0, {max(T - 1, 0)}] (tokens per sequence {T}), got {shift!r}")
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    check_choice("strategy", strategy, ref.MCE_STRATEGIES)
    need_wb = weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and need_wb:
        ref.eager_allowed(strategy, need_wb, reduction != "none")  # raises for eager with 'none'
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    if softcap is not None and not (_real(softcap) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap: expected a finite float > 0, or None (no softcap), got {softcap!r}")
    if not (_real(label_smoothing) and 0.0 <= label_smoothing < 1.0):  # NaN fails the comparison
        raise ValueError(f"label_smoothing: expected a float in [0, 1), got {label_smoothing!r}")
    if not (_real(z_loss) and math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss: expected a finite float >= 0, got {z_loss!r}")
    if num_labelled is not None:
        kept = labels[..., shift:].numel()  # label positions the shift keeps
        if not isinstance(num_labelled, numbers.Integral) or isinstance(num_labelled, bool) \
                or not 0 <= num_labelled <= kept:
            raise ValueError(f"num_labelled: expected None or an int in [0, {kept}] (the label positions the "
                             f"shift keeps), got {num_labelled!r}")


def masked_linear_cross_entropy(
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
    backend: str = "auto",
    strategy: str = "auto",
    num_labelled: int | None = None,
):
    """Cross-entropy of ``hidden @ weight.T + bias`` on labelled rows only, without full logits.

    Args:
        hidden: ``(B, T, C)`` or ``(N, C)``, fp16 / bf16 / fp32 (fp64 on the torch backend).
        weight: ``(V, C)``, hidden's dtype and device (the LM head).
        labels: ``(B, T)`` or ``(N,)`` int64/int32; ``ignore_index`` (an int) marks unlabelled tokens.
        bias: optional ``(V,)``.
        shift: the label at position t is predicted from the hidden state at ``t - shift``
            (1 = MNTP / causal LM; 0 = same position). Applied per sequence for 3-d input.
        reduction: ``"mean"`` over labelled rows, ``"sum"``, or ``"none"`` (a loss per
            shifted label position, 0 where ignored).
        softcap: final-logit softcap ``c * tanh(z / c)`` (Gemma2): a finite ``c > 0``, or None
            (no softcap).
        label_smoothing: as in ``F.cross_entropy``, a float in ``[0, 1)``.
        z_loss: adds ``z_loss * logsumexp(z)**2`` per row; a finite float ``>= 0``.
        return_accuracy: also return the argmax accuracy over labelled rows (0-d fp32).
        backend: ``"auto"``, ``"torch"`` (the chunked reference) or ``"triton"``.
        strategy: how gradients are made when they are wanted. ``"two_pass"``: the forward
            keeps only per-row statistics and the backward recomputes the logits (4 GEMMs of
            labelled rows x C x V with d weight, 3 without). ``"eager"``: the forward
            materialises bounded chunks of whole-vocabulary logits (on the Triton backend
            inside hidden's gradient buffer where its unlabelled rows leave room, else 64 MB)
            and computes the gradients there; the backward only scales them (3
            GEMMs, 2 without d weight); d weight / d bias then need reduction mean or sum.
            On the Triton backend, with d weight, at most C labelled rows and more than
            one row chunk, eager keeps every labelled row's d logits in d weight's own
            buffer and makes d weight once at the end (``eager_stored_plan``), else it adds
            each chunk's share into d weight.
            ``"auto"``: on the torch backend eager whenever allowed (each chunk's dW update
            is cheap next to the saved GEMM on a CPU: measured 0.74x the two-pass time with
            a frozen head). On the Triton backend eager for a frozen head, and with d weight
            where the d logits can be stored, or where its row chunks are few and large
            enough to repay re-writing d weight (``kernels.triton.masked_ce.choose_strategy``;
            on an H200 chunked eager was 1.8x / 1.35x faster than two-pass at V = 32000
            without / with d weight; the stored form is not yet timed on a GPU).
        num_labelled: the number of labels the shift keeps that are not ``ignore_index``,
            when the caller knows it on the host (``MNTPCollator`` counts them as it draws
            them and the MNTP trainer passes it): the op then runs without a host sync. The
            count and the labels' range are still checked, by device-side assertions: a
            ``RuntimeError`` (on a GPU at the next sync, the device stopped before any kernel
            reads a row) instead of the ``ValueError`` below.

    Returns:
        The loss (fp32; fp64 for fp64 inputs), and the accuracy when asked. Every label
        ignored gives a loss of 0 (zeros for ``"none"``) in that same dtype and exact-zero
        gradients, never NaN, whatever hidden / weight / bias hold (their values are not read).

    Autocast: the op runs with autocast off inside (its GEMMs compute in the dtypes it chose
    for the inputs it is given, fp32 logits included), so under ``torch.autocast`` it gives
    what it gives without; the inputs are used in the dtypes they have.

    Synchronisation: one, none with ``num_labelled``. Finding the labelled rows
    (``torch.nonzero``) syncs because every later shape depends on their number; the label
    range check rides on that sync (``reference.labelled_rows``). Given the number, the rows
    are found at that size (``torch.nonzero_static``) without one.

    ``torch.compile``: after the argument checks the op runs eagerly (a graph break). Traced,
    the number of labelled rows became part of the compiled code's guards, so every batch
    with another count compiled again, up to Dynamo's recompile limit.

    Raises ``ValueError`` for bad ranks / shapes / dtypes, a hidden size ``C = 0``, labels
    that the shift keeps outside ``[0, V)`` other than ``ignore_index`` (checked before the LM
    head is touched), an ``ignore_index`` that is not an int, a ``softcap`` / ``z_loss`` /
    ``label_smoothing`` that is not a real number in its range above (None included where
    not documented as allowed, NaN and inf), an unknown ``strategy``, and
    ``strategy="eager"`` with ``reduction="none"`` when weight or bias requires grad.
    """
    _validate(hidden, weight, labels, bias, shift, ignore_index, reduction, softcap, label_smoothing, z_loss, strategy,
              num_labelled)
    be = resolve_backend("masked_linear_cross_entropy", backend, hidden)
    return _run(be, hidden, weight, labels, bias, shift=shift, ignore_index=int(ignore_index), reduction=reduction,
                softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss, return_accuracy=return_accuracy,
                strategy=strategy, num_labelled=None if num_labelled is None else int(num_labelled))


@torch.compiler.disable  # eager inside torch.compile: shapes follow the labelled rows' count
def _run(be, hidden, weight, labels, bias, *, shift, ignore_index, reduction, softcap, label_smoothing, z_loss,
         return_accuracy, strategy, num_labelled=None):
    """The validated call on backend ``be`` (:func:`masked_linear_cross_entropy`)."""
    if be == "triton":
        try:
            from ..kernels.triton import masked_ce as tk
        except ImportError as e:  # pragma: no cover
            warn_once("mce-import", f"masked_linear_cross_entropy: Triton kernel unavailable ({e}); using the reference")
            tk = None
        if tk is not None and hidden.dtype != torch.float64:
            return tk.masked_linear_cross_entropy_triton(
                hidden, weight, labels, bias, shift=shift, ignore_index=ignore_index, reduction=reduction,
                softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss, return_accuracy=return_accuracy,
                strategy=strategy, num_labelled=num_labelled,
            )
    return ref.masked_linear_cross_entropy_ref(
        hidden, weight, labels, bias, shift=shift, ignore_index=ignore_index, reduction=reduction,
        softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss, return_accuracy=return_accuracy,
        strategy=strategy, num_labelled=num_labelled,
    )

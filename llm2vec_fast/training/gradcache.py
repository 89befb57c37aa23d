"""GradCache: contrastive batches whose size does not depend on memory (arXiv 2101.06983).

A batch of ``R`` rows is embedded in chunks of ``mini_batch_size`` rows without autograd;
the loss and ``d loss / d embeddings`` are computed on the whole ``(R, C)`` embedding
matrix; then each chunk is re-run with autograd and back-propagated with its slice of the
cached gradient. Peak activation memory is one chunk's, whatever ``R``. The gradient equals
the one of embedding every chunk with autograd and back-propagating the loss directly,
because the random state (dropout) of each chunk is recorded before its first pass and
replayed for the second, so both passes see the same dropout masks.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch


class RandContext:
    """The CPU and CUDA random states at construction; :meth:`replay` restores them inside a
    forked RNG scope, so a replayed forward draws the same numbers and the caller's random
    stream is left where it was."""

    def __init__(self, device: torch.device | None = None):
        self.cpu_state = torch.get_rng_state()
        self.cuda_devices: list[int] = []
        self.cuda_states: list[torch.Tensor] = []
        if device is not None and device.type == "cuda":
            idx = device.index if device.index is not None else torch.cuda.current_device()
            self.cuda_devices = [idx]
            self.cuda_states = [torch.cuda.get_rng_state(idx)]

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu_state)
            for d, s in zip(self.cuda_devices, self.cuda_states):
                torch.cuda.set_rng_state(s, d)
            yield


def row_chunks(features: dict, size: int) -> list[dict]:
    """Split every ``(R, ...)`` tensor of ``features`` into consecutive row chunks of ``size``."""
    R = next(iter(features.values())).shape[0]
    return [{k: v[i : i + size] for k, v in features.items()} for i in range(0, R, size)]


def packed_chunks(features: dict, size: int) -> list[dict]:
    """Split a packed batch (``ContrastiveCollator(packed=True)``) into chunks of ``size``
    consecutive texts, each a packed row of its own: ``input_ids`` / ``position_ids`` /
    ``embed_mask`` ``(1, n)`` and ``cu_seqlens`` ``(r + 1,)`` from the chunk's first token.
    The texts keep the batch's order (group after group), so the chunks' embeddings
    concatenate into the rows of the padded batch. Reads the text offsets once (a host sync)."""
    bounds = features["group_bounds"]
    cu = features["cu_seqlens"].tolist()
    starts = [bounds[g] + o for g, row in enumerate(cu) for o in row[:-1]]  # every text's first token
    ends = starts[1:] + [bounds[-1]]
    dev = features["cu_seqlens"].device
    out = []
    for i in range(0, len(starts), size):
        a, b = starts[i], ends[min(i + size, len(starts)) - 1]
        offs = [t - a for t in starts[i : i + size]] + [b - a]
        out.append({k: features[k][:, a:b] for k in ("input_ids", "position_ids", "embed_mask")}
                   | {"cu_seqlens": torch.tensor(offs, dtype=torch.int32, device=dev)})
    return out


def gradcache_step(
    encode: Callable[[dict], torch.Tensor],
    features: dict,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    mini_batch_size: int,
    *,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """One GradCache forward + backward; returns the (unscaled) loss, detached.

    Args:
        encode: maps a chunk of ``features`` (``(r, T)`` tensors) to embeddings ``(r, C)``;
            it is called twice per chunk (once under ``no_grad``).
        features: the full batch, ``(R, T)`` tensors, rows independent of each other; or a
            packed batch (chunked by texts, :func:`packed_chunks`).
        loss_fn: maps the full ``(R, C)`` embedding matrix to a 0-d loss.
        mini_batch_size: rows per chunk.
        backward: how to back-propagate a surrogate scalar (the Trainer passes its
            accelerator's, which handles mixed-precision scaling); ``Tensor.backward`` if None.
        no_sync: a context manager factory suppressing DDP's gradient all-reduce; used for
            every chunk but the last, so gradients are reduced once per step.
        loss_scale: multiplies the gradient (e.g. ``1 / gradient_accumulation_steps``).
    """
    packed = "group_bounds" in features
    chunks = (packed_chunks if packed else row_chunks)(features, mini_batch_size)
    device = features["input_ids"].device
    states, embs = [], []
    with torch.no_grad():
        for c in chunks:
            states.append(RandContext(device))
            embs.append(encode(c))
    full = torch.cat(embs, 0).detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(full)
        (grad,) = torch.autograd.grad(loss * loss_scale, full)
    grad = grad.detach()
    backward = backward or (lambda t: t.backward())
    start = 0
    for i, (c, st) in enumerate(zip(chunks, states)):
        last = i == len(chunks) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx, st.replay():
            emb = encode(c)
            g = grad[start : start + emb.shape[0]].to(emb.dtype)
            backward((emb * g).sum())
        start += emb.shape[0]
    return loss.detach()

"""The padding / packing structure of one forward pass, computed once and shared by every layer.

Shapes: ``B`` batch, ``S`` tokens per padded row, ``N`` valid tokens in the batch
(``N <= B * S``), ``H`` heads, ``D`` head dim.

A padded batch is attended either in its padded layout (the Triton kernels and the
reference read the ``(B, S)`` mask directly and skip padded blocks) or, for flash-attn, as
variable-length sequences: the valid tokens gathered into a packed ``(N, H, D)`` layout
(flash-attn's ``unpad_input``), attended with int32 ``cu_seqlens``, and scattered back.
Building the indices and offsets reads the mask (a host synchronisation on CUDA), so it
must happen once per forward, not once per layer:
:func:`padding_info` caches its result on the identity (and in-place version) of the mask
tensor, and the model passes the very same mask object to every layer.
"""
from __future__ import annotations

import torch

from .._tensor_cache import cached as _cached
from .._tensor_cache import note_hole_free
from ..kernels.reference import mask_spans


class PaddingInfo:
    """The key padding mask of a batch and, when it has padding, its unpad structure.

    Attributes:
        mask: ``(B, S)`` bool, True = valid token.
        has_padding: False when every token is valid.
        has_holes: True when some row's valid tokens are not one run (a padded position
            between two valid ones); left / right padding has none.
        batch_idx, seq_idx: ``(N,)`` int64, the row and column of every valid token in
            row-major order.
        cu_seqlens: ``(B + 1,)`` int32 offsets of each row's valid tokens in the packed
            layout, starting at 0.
        max_seqlen: Python int, the most valid tokens in one row.
        total: Python int ``N``.

    ``has_padding`` and ``has_holes`` are read at construction (one host sync per forward);
    a mask without holes is noted (``_tensor_cache.note_hole_free``) so the Triton forward
    compiles without its loop copy for holes. The unpad structure is built on first use and
    kept on the object, so the layers of one forward share it; kernels that read the padded
    layout directly never pay for it. Valid tokens need not be contiguous within a row
    (left, right or arbitrary padding): each row's valid tokens form one sequence.
    """

    __slots__ = ("mask", "has_padding", "has_holes", "_unpad", "__weakref__")

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        # one host sync for both facts: any padding, and any row whose valid tokens are not one
        # run (a False entry between its first and last True)
        all_valid, holes = torch.stack([mask.all(), mask_spans(mask)[2].any()]).tolist()
        self.has_padding = not all_valid
        self.has_holes = bool(holes)
        if not self.has_holes:
            # the Triton forward then compiles without its loop copy for masks with holes
            note_hole_free(mask)
        self._unpad = None

    def _structure(self):
        if self._unpad is None:
            B, S = self.mask.shape
            lens = self.mask.sum(dim=1, dtype=torch.int32)
            batch_idx, seq_idx = torch.nonzero(self.mask, as_tuple=True)
            cu = torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
            max_seqlen = int(lens.max()) if B else 0
            self._unpad = (batch_idx, seq_idx, cu, max_seqlen, int(batch_idx.shape[0]))
        return self._unpad

    batch_idx = property(lambda self: self._structure()[0])
    seq_idx = property(lambda self: self._structure()[1])
    cu_seqlens = property(lambda self: self._structure()[2])
    max_seqlen = property(lambda self: self._structure()[3])
    total = property(lambda self: self._structure()[4])

    @property
    def shape(self):
        """``(B, S)``: lets shape-reading code treat the object like the 2-d mask."""
        return self.mask.shape

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, S, H, D)`` (any strides) -> ``(N, H, D)`` valid tokens, one gather."""
        return x[self.batch_idx, self.seq_idx]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, H, D)`` -> ``(B, S, H, D)`` with zeros at padded positions."""
        B, S = self.mask.shape
        out = x.new_zeros((B, S) + tuple(x.shape[1:]))
        return out.index_put((self.batch_idx, self.seq_idx), x)

    def __repr__(self):
        return f"PaddingInfo(shape={tuple(self.mask.shape)}, has_padding={self.has_padding})"


# One slot per kind: a forward builds one structure and every layer asks for the same one.
# A weak reference, so the cache never keeps a batch alive after its forward.
_MASK_SLOT: list = [None]
_POS_SLOT: list = [None]


def padding_info(mask: torch.Tensor) -> PaddingInfo:
    """:class:`PaddingInfo` of a ``(B, S)`` mask (bool or 0/1), cached on the mask tensor's identity."""
    def build():
        m = mask if mask.dtype == torch.bool else mask.to(torch.bool)
        return PaddingInfo(m)

    return _cached(_MASK_SLOT, mask, build)


def packed_from_position_ids(position_ids: torch.Tensor, batch: int):
    """Sequence boundaries of packed rows, or None when each row holds one sequence.

    ``position_ids``: ``(B, S)`` or ``(1, S)`` integer positions. A new sequence starts at
    the first token of each row and wherever the position does not continue the previous
    one by +1 (positions restarting at 0, as padding-free collators produce). Returns
    ``(cu_seqlens (n + 1,) int32, max_seqlen int)`` over the flattened ``B * S`` tokens.
    Cached on the tensor's identity (and ``batch``): computed once per forward.
    """
    def build():
        pos = position_ids
        if pos.shape[0] != batch:
            pos = pos.expand(batch, -1)
        B, S = pos.shape
        starts = torch.ones((B, S), dtype=torch.bool, device=pos.device)
        if S > 1:
            starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        starts = starts.reshape(-1)
        # Sync once: the number of sequences decides every later shape.
        begin = torch.nonzero(starts).squeeze(1)
        if begin.numel() == B:
            return None
        cu = torch.cat([begin, begin.new_tensor([B * S])]).to(torch.int32)
        return cu, int((cu[1:] - cu[:-1]).max())

    per_batch = _cached(_POS_SLOT, position_ids, dict)  # the same ids may be broadcast to another batch
    if batch not in per_batch:
        per_batch[batch] = build()
    return per_batch[batch]

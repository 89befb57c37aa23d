"""Argument checks shared by every public op.

Each check raises ``ValueError`` naming the argument and what was expected,
before any kernel runs. Checks that would need a host synchronisation (reading
tensor values) are kept to the few places that document them.
"""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, ndims: Sequence[int] | int | None = None, float_=False):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndims is not None:
        ndims = (ndims,) if isinstance(ndims, int) else tuple(ndims)
        if t.dim() not in ndims:
            want = " or ".join(str(n) for n in ndims)
            raise ValueError(f"{name}: expected a {want}-d tensor, got shape {tuple(t.shape)}")
    if float_ and t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype (fp16, bf16, fp32, fp64), got {t.dtype}")
    return t


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, dtype=True, device=True):
    if dtype and a.dtype != b.dtype:
        raise ValueError(f"{name_b}: expected dtype {a.dtype} (the dtype of {name_a}), got {b.dtype}")
    if device and a.device != b.device:
        raise ValueError(f"{name_b}: expected device {a.device} (the device of {name_a}), got {b.device}")


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, *, check_values: bool = True) -> int | None:
    """``cu`` must be int32 ``(B+1,)``, start at 0, be non-decreasing and end at ``total``.

    The value checks read the tensor (a host sync for a CUDA tensor); callers on a
    hot path that built ``cu`` themselves pass ``check_values=False``. Returns the longest
    sequence when the values were read, else None.
    """
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name}: expected an int32 torch.Tensor of shape (B+1,), got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name}: expected shape (B+1,) with B >= 1, got {tuple(cu.shape)}")
    if not check_values:
        return
    c = cu.detach().cpu()
    if int(c[0]) != 0:
        raise ValueError(f"{name}: expected the first entry to be 0, got {int(c[0])}")
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"{name}: expected non-decreasing (monotonic) offsets, got {c.tolist()[:16]}")
    if int(c[-1]) != total:
        raise ValueError(
            f"{name}: last entry {int(c[-1])} disagrees with the tensors' total length {total}"
        )
    return int((c[1:] - c[:-1]).max())


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {sorted(choices)}, got {value!r}")

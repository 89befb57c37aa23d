"""Backend selection shared by every op: the one place that decides what runs.

``auto`` picks the Triton kernels for CUDA tensors when triton imports, and the
pure-PyTorch reference otherwise. ``triton`` on CPU tensors is allowed only under
``TRITON_INTERPRET=1`` (the interpreter tests). An unsupported case on a fast path
falls back to the reference with a one-time warning, never a silent wrong answer.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(op: str, backend: str, tensor: torch.Tensor, allowed=("torch", "triton")) -> str:
    """Map the user's ``backend`` to a concrete one, or raise a ``ValueError`` saying why not."""
    choices = ("auto",) + tuple(allowed)
    if backend not in choices:
        raise ValueError(f"backend: expected one of {list(choices)} for {op}, got {backend!r}")
    if backend == "auto":
        if tensor.is_cuda and triton_importable() and "triton" in allowed:
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_importable():
            raise ValueError(f"backend='triton' for {op}: triton is not importable (pip install 'triton>=3.6')")
        if not tensor.is_cuda and not interpreter_on():
            raise ValueError(
                f"backend='triton' for {op}: tensors are on {tensor.device}; Triton kernels need CUDA tensors "
                "(or TRITON_INTERPRET=1, set before triton is imported, to run them on the CPU)"
            )
    if backend == "cuda":
        if not tensor.is_cuda:
            raise ValueError(f"backend='cuda' for {op}: tensors are on {tensor.device}, expected CUDA tensors")
    return backend

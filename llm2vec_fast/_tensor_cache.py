"""A one-entry cache keyed on a tensor's identity and in-place version.

A forward pass hands the very same mask (or position ids) object to every layer; what is
derived from it (unpad indices, per-row spans) is built at the first layer and reused by
the others, and by the backward. The entry holds a weak reference to its key, so it never
keeps a batch alive, and it records the key's version counter, so an in-place change of
the tensor rebuilds.
"""
from __future__ import annotations

import weakref

import torch


def version(t: torch.Tensor) -> int:
    """``t._version``; inference tensors (made under ``torch.inference_mode``) track none and
    cannot be modified in place outside inference mode, so 0 is a safe constant for them."""
    return 0 if t.is_inference() else t._version


def cached(slot: list, key: torch.Tensor, build):
    """``slot[0]``'s value when it was built from this very ``key`` at its current version,
    else ``build()``, stored in ``slot`` (a one-element list owned by the caller)."""
    entry = slot[0]
    if entry is not None:
        ref, ver, value = entry
        if ref() is key and ver == version(key):
            return value
    value = build()
    slot[0] = (weakref.ref(key), version(key), value)
    return value

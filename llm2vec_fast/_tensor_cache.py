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


# Inference tensors (made under ``torch.inference_mode``) track no version, yet may be edited
# in place inside inference mode; what is derived from one is trusted for one *generation*
# only: a patched model's forward (its pre-hook starts one) or one direct call of a public op.
# The counter must never be traced by torch.compile: Dynamo would guard on its value, and
# every call would recompile (then fall back to eager, or fail with ``fullgraph=True``).
# So :func:`new_generation` does nothing while compiling; compiled code starts a generation
# at run time instead: the public ops through their custom op's ``fresh`` argument, the
# patched model's pre-hook through :func:`new_generation_eager` (a graph break).
_GENERATION = [0]


def new_generation() -> None:
    """Forget what was derived from inference tensors (see ``_GENERATION``); nothing while
    torch.compile traces (the caller arranges a run-time call instead)."""
    if torch.compiler.is_compiling():
        return
    _GENERATION[0] += 1


# :func:`new_generation`, run eagerly even inside a compiled region (a graph break there).
new_generation_eager = torch.compiler.disable(new_generation)


def version(t: torch.Tensor):
    """``t._version``; for an inference tensor, the current generation instead."""
    return ("inference", _GENERATION[0]) if t.is_inference() else t._version


_MISS = object()


def _keys(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def _lookup(slot: list, key):
    """``slot[0]``'s value if it was stored for this very ``key`` (a tensor, or a tuple of
    tensors) at its current version(s), else ``_MISS``."""
    entry = slot[0]
    if entry is not None:
        refs, vers, value = entry
        keys = _keys(key)
        if len(refs) == len(keys) and all(r() is k and v == version(k) for r, v, k in zip(refs, vers, keys)):
            return value
    return _MISS


def _store(slot: list, key, value):
    keys = _keys(key)
    slot[0] = (tuple(weakref.ref(k) for k in keys), tuple(version(k) for k in keys), value)
    return value


def cached(slot: list, key, build):
    """``slot[0]``'s value when it was built from this very ``key`` (a tensor, or a tuple of
    tensors: every one the same object at the same version), else ``build()``, stored in
    ``slot`` (a one-element list owned by the caller)."""
    value = _lookup(slot, key)
    return _store(slot, key, build()) if value is _MISS else value


# Masks whose every row's True entries form one run (left / right padding, no holes), as
# checked on the host by whoever built them (``hf.padding.PaddingInfo``, inside the sync it
# makes anyway). The Triton forward then compiles without its loop copy for masks with holes
# (``MASK_HOLES``), which costs the 128 x 128 D = 128 tile ~30 spilled registers. One entry;
# keyed on identity and version like :func:`cached`, so an in-place edit forgets the fact.
_HOLE_FREE: list = [None]


def note_hole_free(mask: torch.Tensor) -> None:
    """Record that ``mask`` (this object, at its current version) has no holes."""
    _store(_HOLE_FREE, mask, True)


def is_hole_free(mask: torch.Tensor) -> bool:
    """Whether :func:`note_hole_free` was called for this very ``mask`` at its current version."""
    return _lookup(_HOLE_FREE, mask) is True

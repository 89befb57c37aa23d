"""The one-entry cache keyed on tensors' identity and in-place versions (``_tensor_cache``)."""
from __future__ import annotations

import gc

import torch

from llm2vec_fast import _tensor_cache as tc


def test_cached_single_and_tuple_keys():
    slot, builds = [None], []

    def build(tag):
        builds.append(tag)
        return object()

    a, b = torch.zeros(3), torch.zeros(3)
    first = tc.cached(slot, a, lambda: build("a"))
    assert tc.cached(slot, a, lambda: build("a")) is first and builds == ["a"]
    pair = tc.cached(slot, (a, b), lambda: build("ab"))
    assert pair is not first and tc.cached(slot, (a, b), lambda: build("ab")) is pair
    assert builds == ["a", "ab"]
    tc.cached(slot, (b, a), lambda: build("ba"))  # order matters: another key
    tc.cached(slot, b, lambda: build("b"))  # a tuple of one is not a prefix match
    assert builds == ["a", "ab", "ba", "b"]
    pair = tc.cached(slot, (a, b), lambda: build("ab"))
    b.add_(1)  # in place: the second key's version moves
    assert tc.cached(slot, (a, b), lambda: build("ab2")) is not pair
    assert builds[-2:] == ["ab", "ab2"]
    with torch.inference_mode():
        c = torch.zeros(2)
    kept = tc.cached(slot, (a, c), lambda: build("ac"))
    assert tc.cached(slot, (a, c), lambda: build("ac")) is kept  # inference tensors: version 0


def test_cached_holds_no_reference_to_its_keys():
    slot = [None]
    a = torch.zeros(3)
    tc.cached(slot, (a, a), lambda: 1)
    ref = slot[0][0][0]
    del a
    gc.collect()
    assert ref() is None  # the batch is not kept alive by the cache
    b = torch.zeros(3)
    assert tc.cached(slot, (b, b), lambda: 2) == 2

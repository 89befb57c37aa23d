"""Multi-device encode: one spawned worker process per device, each loading its own model
copy from disk. Tested on the CPU with two worker processes (devices=["cpu", "cpu"])."""
from __future__ import annotations

import torch

from test_encoder import INSTR, make_encoder, texts_of


def test_two_cpu_workers_match_single_process(tmp_path):
    enc = make_encoder(pooling_mode="weighted_mean")
    inputs = [[INSTR, t] if i % 3 == 0 else t for i, t in enumerate(texts_of(17, seed=21))]
    local = enc.encode(inputs, batch_size=4, show_progress_bar=False)
    # an in-memory model has no folder: it is saved once and every worker loads that folder
    multi = enc.encode(inputs, batch_size=4, show_progress_bar=False, devices=["cpu", "cpu"])
    torch.testing.assert_close(multi, local, rtol=0, atol=2e-5)
    assert enc._load_spec is None  # nothing about the parent's encoder was changed


def test_worker_shards_cover_every_input_once(monkeypatch):
    """The dispatch itself (no processes): shards partition the inputs and results land in
    input order, whatever order the workers return."""
    import concurrent.futures as cf

    from llm2vec_fast import encoder as encmod

    enc = make_encoder()
    enc._load_spec = {"base_model_name_or_path": "unused"}
    seen = []

    class FakeExecutor:
        def __init__(self, max_workers, mp_context):
            assert max_workers == 3 and mp_context.get_start_method() == "spawn"

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def submit(self, fn, spec, device, pairs, batch_size, n_threads, progress):
            assert fn is encmod._worker_encode and isinstance(spec, dict) and "model" not in spec
            seen.append((device, len(pairs)))
            f = cf.Future()
            # embed each pair as (its length, first char code) so order errors are visible
            f.set_result(torch.tensor([[float(len(p[1])), float(ord(p[1][0]))] for p in pairs]).numpy())
            return f

    monkeypatch.setattr(cf, "ProcessPoolExecutor", FakeExecutor)
    texts = texts_of(10, seed=3)
    out = enc.encode(texts, devices=["cuda:0", "cuda:1", "cuda:2"], show_progress_bar=False)
    assert sorted(d for d, _ in seen) == ["cuda:0", "cuda:1", "cuda:2"]
    assert sum(n for _, n in seen) == len(texts)
    want = torch.tensor([[float(len(t)), float(ord(t[0]))] for t in texts])
    assert torch.equal(out, want)


def test_workers_see_weights_changed_after_loading(tmp_path):
    """Workers rebuilt a loaded encoder from its folder even after its weights changed in
    memory (a training step, an edit through ``.data``, which bumps no version counter):
    silently stale embeddings. A changed encoder is saved for them as an in-memory one is."""
    from llm2vec_fast import LLM2Vec

    make_encoder().save(str(tmp_path / "enc"))
    enc = LLM2Vec.from_pretrained(str(tmp_path / "enc"))
    inputs = texts_of(6, seed=4)
    with torch.no_grad():
        enc.model.get_input_embeddings().weight.data.mul_(3.0)
    local = enc.encode(inputs, show_progress_bar=False)
    multi = enc.encode(inputs, show_progress_bar=False, devices=["cpu", "cpu"])
    torch.testing.assert_close(multi, local, rtol=0, atol=2e-5)
    assert enc._load_spec["base_model_name_or_path"] == str(tmp_path / "enc")  # kept for an unchanged model


def test_devices_are_checked_before_any_worker_starts():
    import pytest

    enc = make_encoder()
    for bad in ("cpu", "cuda:0", [], ["cpu", "nosuchdevice"], torch.device("cpu")):
        with pytest.raises(ValueError, match="devices: expected"):
            enc.encode(["a dog"], devices=bad, show_progress_bar=False)

"""evaluate_sts and the eval-sts / encode commands.

The scoring is checked against a direct computation (one sentence at a time, numpy cosine,
scipy Spearman); the commands on a tiny saved model; real SmolLM2 weights on a small fixed
subset against an unbatched per-sentence forward; the full STS-B baselines (causal 37.15,
bidirectional untrained 16.25) are `slow`.
"""
from __future__ import annotations

import re
import zlib

import numpy as np
import pytest
import torch

from llm2vec_fast.evaluation import evaluate_sts, sts_pairs


class HashEncoder:
    """A deterministic bag-of-hashed-words encoder (no model): enough to test the scoring."""

    def __init__(self, dim=64):
        self.dim = dim
        self.calls = 0

    def vec(self, text):
        v = np.zeros(self.dim)
        for w in text.lower().split():
            v[zlib.crc32(w.encode()) % self.dim] += 1.0
        return v + 1e-3

    def encode(self, sentences, batch_size=32, show_progress_bar=False, convert_to_tensor=False, **kw):
        self.calls += 1
        texts = [s[1] if isinstance(s, (list, tuple)) else s for s in sentences]
        return torch.tensor(np.stack([self.vec(t) for t in texts]))


def direct_score(enc, rows):
    from scipy.stats import spearmanr

    sims = []
    for a, b, _ in rows:
        va, vb = enc.vec(a), enc.vec(b)
        sims.append(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))
    return spearmanr(sims, [r[2] for r in rows]).statistic * 100, sims


@pytest.mark.parametrize("split, max_pairs", [("test", None), ("dev", 100), ("test", 7)])
def test_evaluate_sts_matches_direct_computation(split, max_pairs):
    enc = HashEncoder()
    got = evaluate_sts(enc, split=split, max_pairs=max_pairs, return_details=True)
    rows = sts_pairs(split, max_pairs)
    assert len(rows) == (max_pairs or 1379) == got["n_pairs"]
    want, sims = direct_score(enc, rows)
    np.testing.assert_allclose(got["sims"], sims, rtol=0, atol=1e-12)
    # rounding-level differences only break exact ties (bag-of-words vectors tie often):
    # compare ranks of the rounded similarities, and the score with the returned ones
    from scipy.stats import spearmanr

    gold = [r[2] for r in rows]
    assert got["spearman"] == spearmanr(got["sims"], gold).statistic * 100
    r9 = lambda x: np.round(np.asarray(x), 9)  # noqa: E731
    assert abs(spearmanr(r9(got["sims"]), gold).statistic - spearmanr(r9(sims), gold).statistic) < 1e-12
    assert abs(got["spearman"] - want) < 1.0
    assert enc.calls == 1  # every unique sentence embedded in one encode call


def test_max_pairs_is_the_first_rows_and_bad_args_raise():
    from llm2vec_fast.data import load_sts_benchmark

    assert sts_pairs("test", 25) == load_sts_benchmark("test")[:25]
    with pytest.raises(ValueError, match="split"):
        evaluate_sts(HashEncoder(), split="validation")
    with pytest.raises(ValueError, match="max_pairs"):
        evaluate_sts(HashEncoder(), max_pairs=1)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from test_encoder import make_encoder

    enc = make_encoder()
    path = tmp_path_factory.mktemp("tiny") / "enc"
    enc.save(str(path))
    return str(path)


def test_encode_command(tiny_folder, tmp_path, capsys):
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.cli import main

    texts = [r[0] for r in sts_pairs("test", 9)]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "emb.npy"
    rc = main(["encode", "--model", tiny_folder, "--input", str(tmp_path / "in.txt"), "--output", str(out),
               "--instruction", "Retrieve similar sentences:", "--pooling", "weighted_mean", "--batch-size", "4",
               "--no-progress", "--device", "cpu"])
    assert rc == 0 and "9 x 64" in capsys.readouterr().out
    got = np.load(out)
    enc = LLM2Vec.from_pretrained(tiny_folder, pooling_mode="weighted_mean")
    want = enc.encode([["Retrieve similar sentences:", t] for t in texts], show_progress_bar=False)
    assert got.dtype == np.float32 and got.shape == (9, 64)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=2e-5)


def test_eval_sts_command(tiny_folder, capsys):
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.cli import main

    rc = main(["eval-sts", "--model", tiny_folder, "--max-pairs", "30", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    m = re.search(r"STS-B test Spearman x100: (-?[0-9.]+)", out)
    assert m, out
    want = evaluate_sts(LLM2Vec.from_pretrained(tiny_folder), max_pairs=30)
    assert abs(float(m.group(1)) - want) < 0.006


def test_spearman_equals_scipy_with_ties_nan_and_constant_inputs():
    """The numpy Spearman (average ranks for ties) is scipy's, to the last bit."""
    import warnings

    from scipy.stats import spearmanr

    from llm2vec_fast.evaluation import spearman, spearman_x100

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 80))
        if trial % 3:  # many ties (a few distinct values), sometimes a constant input
            x = rng.integers(0, int(rng.integers(1, 10)), n) / 4.0
        else:
            x = rng.normal(size=n)
        y = rng.integers(0, 6, n) * 0.2  # like STS-B gold scores: few distinct values
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on a constant input
            want = spearmanr(x, y).statistic
        np.testing.assert_equal(spearman(x, y), want)
        np.testing.assert_equal(spearman_x100(list(x), list(y)), want * 100.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == 1.0
    assert spearman([1, 2, 3], [3, 2, 2]) == spearmanr([1, 2, 3], [3, 2, 2]).statistic
    for x, y in [([1, 2, float("nan")], [1, 2, 3]), ([1, 1, 1], [1, 2, 3]), ([1, 2, 3], [5, 5, 5]),
                 ([1], [2]), ([], [])]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warnings from ours
            assert np.isnan(spearman(x, y))
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2, 3], [1, 2])


def test_scoring_needs_no_scipy(monkeypatch):
    """scipy is a test / bench extra, not a dependency: evaluate_sts (eval-sts, demo) works
    when it cannot be imported."""
    import importlib
    import sys

    import llm2vec_fast.evaluation as evaluation

    monkeypatch.setitem(sys.modules, "scipy", None)  # "not installed": every import of it fails
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(ImportError):
        import scipy.stats  # noqa: F401
    evaluation = importlib.reload(evaluation)
    enc = HashEncoder()
    got = evaluation.evaluate_sts(enc, split="dev", max_pairs=100, return_details=True)
    rows = sts_pairs("dev", 100)
    monkeypatch.undo()
    from scipy.stats import spearmanr

    assert got["spearman"] == spearmanr(got["sims"], [r[2] for r in rows]).statistic * 100


def test_eval_sts_command_without_scipy(tiny_folder):
    """The command end to end in a process where scipy cannot be imported."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['scipy'] = None; from llm2vec_fast.cli import main; "
            f"sys.exit(main(['eval-sts', '--model', {tiny_folder!r}, '--max-pairs', '20', '--device', 'cpu']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "STS-B test Spearman x100:" in r.stdout


# --------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M (loaded once per module, ~20 s)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from llm2vec_fast import LLM2Vec

    try:
        return LLM2Vec.from_pretrained("smollm2-135m", enable_bidirectional=False)
    except (ModuleNotFoundError, FileNotFoundError) as e:  # pragma: no cover
        pytest.skip(str(e))


@torch.no_grad()
def test_smollm2_causal_subset_matches_unbatched_forward(smollm2):
    """24 pairs: the batched, sorted, padded encoder equals one sentence at a time."""
    from scipy.stats import spearmanr

    rows = sts_pairs("test", 24)
    got = evaluate_sts(smollm2, max_pairs=24, batch_size=16, return_details=True)
    tok, model = smollm2.tokenizer, smollm2.model
    sims = []
    for a, b, _ in rows:
        v = []
        for s in (a, b):
            ids = tok(s, return_tensors="pt")["input_ids"]  # SmolLM2 adds no BOS: every token pooled
            v.append(model(input_ids=ids).last_hidden_state[0].double().mean(0))
        sims.append(float(torch.nn.functional.cosine_similarity(v[0], v[1], dim=0)))
    np.testing.assert_allclose(got["sims"], sims, rtol=0, atol=1e-5)
    assert abs(got["spearman"] - spearmanr(sims, [r[2] for r in rows]).statistic * 100) < 0.01


@pytest.mark.slow
def test_smollm2_full_sts_baselines(smollm2):
    """The measured baselines: causal 37.15, bidirectional untrained 16.25 (within 0.5)."""
    from llm2vec_fast import patch_model, unpatch_model

    causal = evaluate_sts(smollm2, batch_size=64)
    assert abs(causal - 37.15) <= 0.5, causal
    patch_model(smollm2.model)
    try:
        bidir = evaluate_sts(smollm2, batch_size=64)
    finally:
        unpatch_model(smollm2.model)
    assert abs(bidir - 16.25) <= 0.5, bidir


def test_smollm2_mntp_output_of_the_gguf_model_saves(smollm2, tmp_path):
    """Full fine-tuning of the default (GGUF-loaded) model: save_mntp_output writes plain
    safetensors (transformers refuses to save a GGUF-quantised model as such)."""
    from transformers import AutoModel

    from llm2vec_fast.training.config import MNTPConfig, make_config
    from llm2vec_fast.training.pipeline import save_mntp_output

    out = str(tmp_path / "mntp")
    save_mntp_output(smollm2.model, smollm2.tokenizer, make_config(MNTPConfig, dict(output_dir=out, use_lora=False)))
    back = AutoModel.from_pretrained(out)
    w = smollm2.model.layers[3].mlp.down_proj.weight
    assert torch.equal(back.layers[3].mlp.down_proj.weight, w)

"""The MTEB wrapper, run through mteb's own STS evaluation code (AbsTaskSTS.evaluate ->
AnySTSEvaluator -> its Spearman) on STS-B rows from llm2vec_fast.data; no hub access."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before mteb / huggingface_hub / datasets are imported
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

mteb = pytest.importorskip("mteb")

from test_encoder import make_encoder  # noqa: E402

N_PAIRS = 40


def _task_with_local_data(n_pairs):
    from datasets import Dataset, DatasetDict

    from llm2vec_fast.data import load_sts_benchmark

    rows = load_sts_benchmark("test")[:n_pairs]
    task = mteb.get_task("STSBenchmark")
    ds = Dataset.from_dict({"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows],
                            "score": [r[2] for r in rows]})
    task.dataset = {"default": DatasetDict({"test": ds})}
    task.data_loaded = True
    return task, rows


def test_mteb_sts_evaluator_on_local_stsb(monkeypatch):
    from scipy.stats import spearmanr

    from llm2vec_fast.mteb_wrapper import LLM2VecMTEB
    from mteb.models.models_protocols import EncoderProtocol

    enc = make_encoder()
    model = LLM2VecMTEB(encoder=enc)
    assert isinstance(model, EncoderProtocol)
    assert model.mteb_model_meta.embed_dim == enc.model.config.hidden_size

    seen = []
    real_encode = enc.encode

    def spy(sentences, **kw):
        seen.extend(sentences)
        return real_encode(sentences, **kw)

    monkeypatch.setattr(enc, "encode", spy)
    task, rows = _task_with_local_data(N_PAIRS)
    scores = task.evaluate(model, split="test", encode_kwargs={"batch_size": 8})["default"]

    # the task's instruction, in LLM2Vec's format, paired with every text
    instr = "Retrieve semantically similar text:"
    assert len(seen) == 2 * N_PAIRS and all(s[0] == instr for s in seen)
    # mteb's cosine Spearman equals one computed here from the encoder directly
    monkeypatch.setattr(enc, "encode", real_encode)
    e1 = enc.encode([[instr, r[0]] for r in rows], show_progress_bar=False).double()
    e2 = enc.encode([[instr, r[1]] for r in rows], show_progress_bar=False).double()
    cos = torch.nn.functional.cosine_similarity(e1, e2).numpy()
    want = spearmanr(cos, [r[2] for r in rows]).statistic
    assert abs(scores["cosine_spearman"] - want) < 1e-6
    assert scores["main_score"] == scores["cosine_spearman"]
    assert np.isfinite(scores["cosine_pearson"])


def test_wrapper_without_instructions_and_bad_args():
    from llm2vec_fast.mteb_wrapper import LLM2VecMTEB, llm2vec_instruction

    assert llm2vec_instruction("Retrieve text.") == "Retrieve text:"
    assert llm2vec_instruction("Retrieve text:") == "Retrieve text:"
    assert llm2vec_instruction("") == ""
    enc = make_encoder()
    model = LLM2VecMTEB(encoder=enc, use_instructions=False)
    task, rows = _task_with_local_data(6)
    from torch.utils.data import DataLoader

    loader = DataLoader([{"text": r[0]} for r in rows], batch_size=4,
                        collate_fn=lambda b: {"text": [x["text"] for x in b]})
    out = model.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default", batch_size=3)
    assert isinstance(out, np.ndarray) and out.shape == (6, enc.model.config.hidden_size)
    np.testing.assert_allclose(out, enc.encode([r[0] for r in rows], show_progress_bar=False).numpy(), atol=2e-5)
    with pytest.raises(ValueError, match="encoder"):
        LLM2VecMTEB(encoder="not an encoder")
    with pytest.raises(ValueError, match="model_name"):
        LLM2VecMTEB()

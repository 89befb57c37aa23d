"""The MTEB wrapper, run through mteb's own STS evaluation code (AbsTaskSTS.evaluate ->
AnySTSEvaluator -> its Spearman) on STS-B rows from llm2vec_fast.data; no hub access.
The choice of instruction from ``model_prompts`` is also checked against a minimal stand-in
for mteb (runs without mteb installed)."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before mteb / huggingface_hub / datasets are imported
os.environ["HF_DATASETS_OFFLINE"] = "1"

import enum  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import mteb
except ImportError:  # the tests against mteb itself are skipped; the stub ones run
    mteb = None

from test_encoder import make_encoder  # noqa: E402

needs_mteb = pytest.mark.skipif(mteb is None, reason="mteb is not installed")

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


@needs_mteb
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


@needs_mteb
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


# ----------------------------------------------------------------------------- model_prompts


def _stub_mteb():
    """The parts of mteb 2.x the wrapper touches; ``get_instruction`` as in mteb 2.0, which
    looks ``prompts_dict`` up by task name only (newer versions add task and prompt types,
    but no "{task}-{prompt type}" keys)."""
    class PromptType(enum.Enum):
        query = "query"
        document = "document"

    class AbsEncoder:
        model_prompts = None
        prompts_dict = None

        @staticmethod
        def validate_task_to_prompt_name(task_to_prompt, raise_for_invalid_keys=True):
            return task_to_prompt or None

        def get_instruction(self, task_metadata, prompt_type):
            prompt = task_metadata.prompt
            if self.prompts_dict and task_metadata.name in self.prompts_dict:
                prompt = self.prompts_dict[task_metadata.name]
            if isinstance(prompt, dict) and prompt_type:
                return prompt.get(prompt_type.value) or ""
            return prompt or "the task type's default instruction"

    class ModelMeta:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    mods = {name: types.ModuleType(name) for name in
            ("mteb", "mteb.models", "mteb.models.abs_encoder", "mteb.models.model_meta")}
    mods["mteb.models.abs_encoder"].AbsEncoder = AbsEncoder
    mods["mteb.models.abs_encoder"].PromptType = PromptType
    mods["mteb.models.model_meta"].ModelMeta = ModelMeta
    mods["mteb.models.model_meta"].ScoringFunction = enum.Enum("ScoringFunction", {"COSINE": "cosine"})
    return mods


def _wrapper_module(which, monkeypatch):
    """llm2vec_fast.mteb_wrapper imported against the stub (a private copy of the module, so
    the real one in sys.modules is untouched) or against the installed mteb."""
    if which == "mteb":
        if mteb is None:
            pytest.skip("mteb is not installed")
        import llm2vec_fast.mteb_wrapper as wrapper
        from mteb.models.abs_encoder import PromptType
        return wrapper, PromptType
    mods = _stub_mteb()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    import llm2vec_fast

    path = os.path.join(os.path.dirname(llm2vec_fast.__file__), "mteb_wrapper.py")
    spec = importlib.util.spec_from_file_location("llm2vec_fast._mteb_wrapper_on_stub", path)
    wrapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapper)
    return wrapper, mods["mteb.models.abs_encoder"].PromptType


@pytest.fixture(scope="module")
def small_encoder():
    return make_encoder()


@pytest.mark.parametrize("which", ["stub", "mteb"])
@pytest.mark.parametrize("prompts, want", [
    ({"STSBenchmark": "By name."}, "By name:"),
    ({"STS": "By type."}, "By type:"),
    ({"query": "By prompt type."}, "By prompt type:"),
    ({"STS-query": "By type and prompt type."}, "By type and prompt type:"),
    ({"STSBenchmark-query": "By name and prompt type."}, "By name and prompt type:"),
    # the documented order: name-prompt type, name, type-prompt type, type, prompt type
    ({"query": "p", "STS": "t", "STS-query": "tp", "STSBenchmark": "n", "STSBenchmark-query": "np"}, "np:"),
    ({"query": "p", "STS": "t", "STS-query": "tp", "STSBenchmark": "n"}, "n:"),
    ({"query": "p", "STS": "t", "STS-query": "tp"}, "tp:"),
    ({"query": "p", "STS": "t", "STS-document": "other prompt type"}, "t:"),
    ({"query": "p", "Banking77Classification": "another task", "Classification": "another type"}, "p:"),
    # no key applies: the task's own instruction
    ({"document": "p", "Banking77Classification": "x", "STSBenchmark-document": "y"}, "Retrieve similar text:"),
    (None, "Retrieve similar text:"),
    ({"STS": ""}, ""),  # an empty instruction: plain texts
])
def test_model_prompts_by_name_type_and_prompt_type(monkeypatch, small_encoder, which, prompts, want):
    wrapper, PromptType = _wrapper_module(which, monkeypatch)
    enc = small_encoder
    seen = []
    real = enc.encode
    monkeypatch.setattr(enc, "encode", lambda s, **kw: (seen.extend(s), real(s, **kw))[1])
    model = wrapper.LLM2VecMTEB(encoder=enc, model_prompts=prompts, device="cpu")
    meta = SimpleNamespace(name="STSBenchmark", type="STS", prompt="Retrieve similar text.")
    out = model.encode([{"text": ["a man plays guitar", "dogs run"]}], task_metadata=meta, hf_split="test",
                       hf_subset="default", prompt_type=PromptType.query)
    assert out.shape == (2, enc.model.config.hidden_size)
    if want:
        assert seen == [[want, "a man plays guitar"], [want, "dogs run"]]
    else:
        assert seen == ["a man plays guitar", "dogs run"]
    assert wrapper.llm2vec_instruction(model.task_instruction(meta, PromptType.query)) == want

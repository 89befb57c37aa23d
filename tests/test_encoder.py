"""LLM2Vec encoder: drop-in API, instruction masking, pooling on either padding side, order,
save/load, truncation and input errors.

Most tests use a tiny random Llama (tests/tiny_models.py) with small BPE tokenizers trained
here in a second from STS-B sentences: a GPT-2 style byte-level one and a SentencePiece
style (Metaspace) one, optionally adding a BOS token. The oracle for every embedding is
independent of the encoder's code: each input runs alone (batch 1, no padding) through the
model, the text's tokens are located by tokenising the text on its own (the tail of the
full sequence), and the pooled vector is computed by direct indexing.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from llm2vec_fast.ops import _dispatch

from tiny_models import tiny_model

INSTR = "Given a sentence, retrieve similar ones:"
MODES = ("mean", "weighted_mean", "last_token", "eos_token", "bos_token")


# --------------------------------------------------------------------------------------
# Fixtures: tokenizers and models
# --------------------------------------------------------------------------------------


def _make_tokenizer(style: str, bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from llm2vec_fast.data import load_sts_benchmark

    rows = load_sts_benchmark("train")[:1500]
    corpus = [r[0] for r in rows] + [r[1] for r in rows]
    tk = Tokenizer(models.BPE(unk_token=None))
    specials = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 = the tiny configs' pad / bos / eos
    if style == "bytelevel":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tk.decoder = decoders.Metaspace(prepend_scheme="first")
        tr = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tk.train_from_iterator(corpus, tr)
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


_TOK_CACHE: dict = {}


def get_tokenizer(style="bytelevel", bos=False):
    key = (style, bos)
    if key not in _TOK_CACHE:
        _TOK_CACHE[key] = _make_tokenizer(style, bos)
    return _TOK_CACHE[key]


def make_encoder(bidirectional=True, style="bytelevel", bos=False, **kw):
    from llm2vec_fast import LLM2Vec, patch_model

    tok = get_tokenizer(style, bos)
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512)
    if bidirectional:
        patch_model(model, backend="torch")
    return LLM2Vec(model, tok, **kw)


def texts_of(n, seed=0):
    """STS-B test sentences of varied lengths (a fresh, reproducible draw)."""
    from llm2vec_fast.data import load_sts_benchmark

    rows = load_sts_benchmark("test")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(rows), size=n, replace=False)
    return [rows[i][int(rng.integers(2))] for i in idx]


# --------------------------------------------------------------------------------------
# The independent oracle
# --------------------------------------------------------------------------------------


def oracle_region(tok, instruction, text, skip_instruction=True):
    """Token ids of one input and its pooled span ``[s, e)``, built without the encoder."""
    instr = instruction.strip()
    full = instr + " " + text if instr else text
    ids = tok(full, add_special_tokens=True)["input_ids"]
    text_ids = tok(" " + text if instr else text, add_special_tokens=False)["input_ids"]
    n_lead = len(tok("", add_special_tokens=True)["input_ids"])  # BOS if the tokenizer adds one
    e = len(ids)
    s = e - len(text_ids)
    assert ids[s:e] == text_ids, "oracle assumption: the text's tokens are the tail of the full sequence"
    assert s >= n_lead
    if not skip_instruction:
        s = 0
    return ids, s, e


@torch.no_grad()
def oracle_embedding(model, tok, instruction, text, mode, skip_instruction=True, max_length=None):
    ids, s, e = oracle_region(tok, instruction, text, skip_instruction)
    if mode == "eos_token":
        ids = ids + [tok.eos_token_id]
        e = len(ids)
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length]
        e = min(e, max_length)
    h = model(input_ids=torch.tensor([ids])).last_hidden_state[0].double()
    r = h[s:e]
    if mode == "mean":
        return r.mean(0)
    if mode == "weighted_mean":
        w = torch.arange(1, r.shape[0] + 1, dtype=torch.float64)
        return (w[:, None] * r).sum(0) / w.sum()
    if mode in ("last_token", "eos_token"):
        return r[-1]
    if mode == "bos_token":
        # the BOS token's state, as the original llm2vec; without a BOS the first pooled token
        return h[0] if ids[0] == tok.bos_token_id else r[0]
    raise AssertionError(mode)


def assert_matches_oracle(enc, inputs, got, atol=2e-5):
    """Row i of ``got`` equals the oracle of input i (fp32 model: padding and batching
    change only summation order, so the budget is a few fp32 ulps of O(1) activations)."""
    assert got.shape[0] == len(inputs)
    for i, x in enumerate(inputs):
        instr, text = (x if isinstance(x, (list, tuple)) else ("", x))
        want = oracle_embedding(enc.model, enc.tokenizer, instr, text, enc.pooling_mode, enc.skip_instruction)
        err = (got[i].double() - want).abs().max().item()
        assert err <= atol, f"input {i} ({mode_str(enc)}): max error {err:.2e} > {atol:.0e}"


def mode_str(enc):
    return f"pooling={enc.pooling_mode}, padding={enc.padding_side}"


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_original_style_code_runs_unchanged(tmp_path):
    """The llm2vec README's code (from_pretrained with a peft adapter, instruction pairs,
    torch_dtype / device_map keywords) runs as written against our class."""
    from peft import LoraConfig, get_peft_model

    tok = get_tokenizer()
    base = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")

    # --- as in the llm2vec README ---
    from llm2vec_fast import LLM2Vec

    l2v = LLM2Vec.from_pretrained(
        str(tmp_path / "base"),
        peft_model_name_or_path=str(tmp_path / "adapter"),
        device_map="cpu",
        torch_dtype=torch.float32,
    )
    instruction = "Given a web search query, retrieve relevant passages that answer the query:"
    queries = [
        [instruction, "how much protein should a female eat"],
        [instruction, "summit define"],
    ]
    q_reps = l2v.encode(queries)
    documents = [
        "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day.",
        "Definition of summit for English Language Learners. : 1  the highest point of a mountain.",
    ]
    d_reps = l2v.encode(documents)
    q_reps_norm = torch.nn.functional.normalize(q_reps, p=2, dim=1)
    d_reps_norm = torch.nn.functional.normalize(d_reps, p=2, dim=1)
    cos_sim = torch.mm(q_reps_norm, d_reps_norm.transpose(0, 1))
    # --- end ---
    assert cos_sim.shape == (2, 2) and torch.isfinite(cos_sim).all()
    assert q_reps.dtype == torch.float32 and q_reps.device.type == "cpu"
    assert l2v._is_patched(), "enable_bidirectional=True (the default) must patch the model"
    # the adapter is live (not silently dropped): the base alone gives other vectors
    plain = LLM2Vec.from_pretrained(str(tmp_path / "base"))
    assert (plain.encode(queries, show_progress_bar=False) - q_reps).abs().max() > 1e-4
    assert_matches_oracle(l2v, queries, q_reps)


def test_output_order_equals_input_order():
    enc = make_encoder()
    texts = texts_of(23, seed=1)
    inputs = [[INSTR, t] if i % 3 == 0 else t for i, t in enumerate(texts)]
    got = enc.encode(inputs, batch_size=4, show_progress_bar=False)
    assert_matches_oracle(enc, inputs, got)
    # a permutation of the input permutes the output the same way
    perm = torch.randperm(len(inputs)).tolist()
    got_p = enc.encode([inputs[i] for i in perm], batch_size=5, show_progress_bar=False)
    torch.testing.assert_close(got_p, got[perm], rtol=0, atol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("mode", MODES)
def test_pooling_modes_both_padding_sides(mode, padding_side):
    bidir = mode != "weighted_mean"  # weighted_mean also runs through a causal model
    enc = make_encoder(bidirectional=bidir, bos=(mode == "bos_token"), pooling_mode=mode, padding_side=padding_side)
    texts = texts_of(7, seed=hash((mode, padding_side)) % 1000)
    inputs = [[INSTR, t] if i % 2 else t for i, t in enumerate(texts)]
    got = enc.encode(inputs, batch_size=7, show_progress_bar=False)
    assert torch.isfinite(got).all()
    assert_matches_oracle(enc, inputs, got)


@pytest.mark.parametrize("style", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("bos", [False, True])
def test_instruction_tokens_are_context_not_pooled(style, bos):
    """[instruction, text] pools exactly the text's tokens while the instruction is attended."""
    enc = make_encoder(style=style, bos=bos)
    texts = texts_of(5, seed=7)
    pairs = [[INSTR, t] for t in texts]
    got = enc.encode(pairs, batch_size=2, show_progress_bar=False)
    assert_matches_oracle(enc, pairs, got)
    # bidirectional: the instruction changes the text tokens' states, so the vector differs
    alone = enc.encode(texts, batch_size=2, show_progress_bar=False)
    assert (got - alone).abs().max() > 1e-3
    # the pooled span per input, straight from the encoder's tokenisation
    ids, st, en = enc._tokenize_items([(INSTR, t) for t in texts])
    for (i_, t), s, e, x in zip(pairs, st, en, ids):
        o_ids, o_s, o_e = oracle_region(enc.tokenizer, i_, t)
        assert (x, s, e) == (o_ids, o_s, o_e)
    # skip_instruction=False pools the whole input (special tokens included)
    enc.skip_instruction = False
    got_all = enc.encode(pairs, batch_size=2, show_progress_bar=False)
    assert_matches_oracle(enc, pairs, got_all)


def test_instruction_count_fallback_equals_offsets():
    """Tokenizers without offsets count instruction tokens from one batched call instead."""
    for style in ("bytelevel", "metaspace"):
        enc = make_encoder(style=style, bos=True)
        pairs = [(INSTR, t) for t in texts_of(6, seed=3)] + [("", "plain text"), ("  Padded instr  ", "x y")]
        by_offsets = enc._tokenize_items(pairs)
        enc._use_offsets = False
        by_count = enc._tokenize_items(pairs)
        assert by_offsets == by_count, style


def test_packed_forward_equals_padded():
    enc = make_encoder(packed=False)
    inputs = [[INSTR, t] if i % 2 else t for i, t in enumerate(texts_of(9, seed=5))]
    padded = enc.encode(inputs, batch_size=4, show_progress_bar=False)
    enc.packed = True
    packed = enc.encode(inputs, batch_size=4, show_progress_bar=False)
    torch.testing.assert_close(packed, padded, rtol=0, atol=2e-5)
    assert_matches_oracle(enc, inputs, packed)


def test_causal_left_padding_positions():
    """A causal (unpatched) model with left padding sees each text at positions 0..n-1."""
    enc = make_encoder(bidirectional=False, padding_side="left")
    inputs = texts_of(6, seed=11)
    got = enc.encode(inputs, batch_size=6, show_progress_bar=False)
    assert_matches_oracle(enc, inputs, got)


def test_save_then_load_gives_identical_embeddings(tmp_path):
    from llm2vec_fast import LLM2Vec

    enc = make_encoder(pooling_mode="weighted_mean", max_length=64, doc_max_length=40, padding_side="left")
    inputs = [[INSTR, t] if i % 2 else t for i, t in enumerate(texts_of(6, seed=2))]
    before = enc.encode(inputs, batch_size=3, show_progress_bar=False)
    enc.save(str(tmp_path / "enc"))
    assert (tmp_path / "enc" / "model.safetensors").is_file()
    assert (tmp_path / "enc" / "llm2vec_fast_config.json").is_file()
    loaded = LLM2Vec.from_pretrained(str(tmp_path / "enc"))
    assert (loaded.pooling_mode, loaded.max_length, loaded.doc_max_length, loaded.padding_side) == (
        "weighted_mean", 64, 40, "left"
    )
    after = loaded.encode(inputs, batch_size=3, show_progress_bar=False)
    assert torch.equal(before, after)


def test_save_peft_merged_and_unmerged(tmp_path):
    from peft import LoraConfig, get_peft_model

    from llm2vec_fast import LLM2Vec

    tok = get_tokenizer()
    base = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    from llm2vec_fast import patch_model

    patch_model(peft_model, backend="torch")
    enc = LLM2Vec(peft_model, tok)
    enc._weights_recipe = (str(tmp_path / "base"), [], {})  # what from_pretrained / the trainer record
    inputs = texts_of(4, seed=9)
    before = enc.encode(inputs, show_progress_bar=False)
    enc.save(str(tmp_path / "adapter_only"))
    a = LLM2Vec.from_pretrained(str(tmp_path / "adapter_only")).encode(inputs, show_progress_bar=False)
    torch.testing.assert_close(a, before, rtol=0, atol=1e-5)
    enc.save(str(tmp_path / "merged"), merge_before_save=True)
    m = LLM2Vec.from_pretrained(str(tmp_path / "merged")).encode(inputs, show_progress_bar=False)
    torch.testing.assert_close(m, before, rtol=0, atol=1e-5)


def test_adapter_only_save_records_how_the_base_loads(tmp_path, monkeypatch):
    """A base loaded with an extra argument naming its weights (a GGUF file, a subfolder, a
    revision) saved as an unmerged adapter: the folder recorded only the base's path, so it
    did not load back (for the GGUF SmolLM2 folder: 'Unrecognized model'). A subfolder stands
    in for a GGUF file here (the same mechanism; the GGUF round trip was checked by hand)."""
    from peft import get_peft_model

    from llm2vec_fast import LLM2Vec

    tok = get_tokenizer()
    tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512).save_pretrained(tmp_path / "base" / "w")
    tok.save_pretrained(tmp_path / "base")
    get_peft_model(tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512),
                   _lora(3)).save_pretrained(tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)  # relative names: the saved config must not depend on this folder
    enc = LLM2Vec.from_pretrained("base", subfolder="w", peft_model_name_or_path="adapter")
    inputs = texts_of(3, seed=11)
    before = enc.encode(inputs, show_progress_bar=False)
    enc.save("saved")
    cfg = json.load(open(tmp_path / "saved" / "llm2vec_fast_config.json"))
    assert cfg["adapter_only"] and cfg["base_model_kwargs"] == {"subfolder": "w"}
    monkeypatch.chdir(tmp_path / "adapter")
    again = LLM2Vec.from_pretrained(str(tmp_path / "saved"))
    torch.testing.assert_close(again.encode(inputs, show_progress_bar=False), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "empty"),
        ([["instr", "text", "extra"]], r"sentences\[0\].*2 strings.*got 3"),
        ([["only one"]], r"sentences\[0\].*got 1"),
        (["ok", 5], r"sentences\[1\].*got int"),
        ([["instr", 3]], r"sentences\[0\].*pair of strings"),
        (None, "sentences: expected a list"),
        ({"a": 1}, "sentences: expected a list"),
    ],
)
def test_bad_inputs_raise_clear_errors(bad, match):
    enc = make_encoder()
    with pytest.raises(ValueError, match=match):
        enc.encode(bad, show_progress_bar=False)


def test_bad_settings_raise():
    from llm2vec_fast import LLM2Vec

    enc = make_encoder()
    with pytest.raises(ValueError, match="pooling_mode"):
        LLM2Vec(enc.model, enc.tokenizer, pooling_mode="max")
    with pytest.raises(ValueError, match="max_length"):
        LLM2Vec(enc.model, enc.tokenizer, max_length=0)
    with pytest.raises(ValueError, match="padding_side"):
        LLM2Vec(enc.model, enc.tokenizer, padding_side="middle")
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(["a"], batch_size=0)


def test_long_text_truncated_with_one_warning():
    enc = make_encoder(max_length=12, doc_max_length=400)
    long_text = " ".join(texts_of(6, seed=4))
    short = "A man is playing a flute."
    _dispatch._WARNED.discard("encoder-truncate")
    with pytest.warns(RuntimeWarning, match="max_length=12"):
        got = enc.encode([long_text, short], show_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        again = enc.encode([long_text], show_progress_bar=False)
    torch.testing.assert_close(again[0], got[0], rtol=0, atol=1e-5)
    ids, _, _ = oracle_region(enc.tokenizer, "", long_text)
    want = oracle_embedding(enc.model, enc.tokenizer, "", long_text, "mean", max_length=12)
    assert len(ids) > 12
    assert (got[0].double() - want).abs().max() < 2e-5
    assert_matches_oracle(enc, [short], got[1:])
    # doc_max_length limits the text part only, the instruction is kept
    enc2 = make_encoder(max_length=512, doc_max_length=5)
    _dispatch._WARNED.discard("encoder-doc-truncate")
    with pytest.warns(RuntimeWarning, match="doc_max_length=5"):
        ids2, s2, e2 = enc2._tokenize_items([(INSTR, long_text)])
    assert e2[0] - s2[0] == 5 and s2[0] == len(enc2.tokenizer(INSTR)["input_ids"])


def test_return_types_and_normalize():
    enc = make_encoder()
    inputs = texts_of(3, seed=6)
    t = enc.encode(inputs, show_progress_bar=False)
    n = enc.encode(inputs, convert_to_numpy=True, show_progress_bar=False)
    assert isinstance(t, torch.Tensor) and isinstance(n, np.ndarray) and n.dtype == np.float32
    np.testing.assert_array_equal(n, t.numpy())
    t2 = enc.encode(inputs, convert_to_numpy=True, convert_to_tensor=True, show_progress_bar=False)
    assert isinstance(t2, torch.Tensor)
    u = enc.encode(inputs, normalize_embeddings=True, show_progress_bar=False)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(u, torch.nn.functional.normalize(t, dim=-1))
    one = enc.encode(inputs[0], show_progress_bar=False)
    assert one.shape == t.shape[1:]
    torch.testing.assert_close(one, t[0], rtol=0, atol=1e-5)


def test_empty_text_pools_to_zero_not_nan():
    enc = make_encoder()
    got = enc.encode([[INSTR, ""], "text"], show_progress_bar=False)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert torch.isfinite(got).all()


def test_tokenize_forward_has_gradients():
    """The trainer path: tokenize -> forward keeps autograd (every parameter reached)."""
    enc = make_encoder()
    enc.model.train()
    feats = enc.tokenize([[INSTR, "A man plays."], "Two dogs run in a field."])
    emb = enc(feats)
    assert emb.shape == (2, enc.model.config.hidden_size)
    emb.pow(2).sum().backward()
    no_grad = [n for n, p in enc.model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad[:5]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_packed_and_padded_encode_match_reference(dtype):
    """On CUDA the patched model runs the Triton kernels, packed (the default there) or
    padded; both must sit within the tolerance rule around the fp32 CPU oracle, with the
    budget set by the same model run in ``dtype`` on the reference attention backend."""
    from helpers import max_err

    from llm2vec_fast import LLM2Vec, patch_model

    tok = get_tokenizer()
    inputs = [[INSTR, t] if i % 2 else t for i, t in enumerate(texts_of(11, seed=13))]
    # head dim 64: the tiny configs' 16 is not a Triton head dim (the attention would fall back)
    cfg = dict(vocab_size=len(tok), max_position_embeddings=512, head_dim=64)
    oracle = LLM2Vec(patch_model(tiny_model("llama", **cfg), backend="torch"), tok).encode(
        inputs, batch_size=4, show_progress_bar=False)  # fp32, CPU

    def cuda_encoder(backend):
        m = tiny_model("llama", dtype=dtype, **cfg).cuda()
        patch_model(m, backend=backend)
        return LLM2Vec(m, tok)

    ref = cuda_encoder("torch")
    ref.packed = False
    ref_native = ref.encode(inputs, batch_size=4, show_progress_bar=False)
    enc = cuda_encoder("auto")
    assert enc._use_packed(torch.device("cuda")), "packed forward must be the default on CUDA when patched"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference would warn
        packed = enc.encode(inputs, batch_size=4, show_progress_bar=False)
        enc.packed = False
        padded = enc.encode(inputs, batch_size=4, show_progress_bar=False)
    budget = 2 * max_err(ref_native, oracle) + 1e-3
    for name, got in (("packed", packed), ("padded", padded)):
        assert got.device.type == "cpu" and got.dtype == torch.float32 and torch.isfinite(got).all()
        err = max_err(got, oracle)
        assert err <= budget, f"{name} {dtype}: max error {err:.3e} > budget {budget:.3e}"


@pytest.mark.parametrize("packed", [False, True])
def test_empty_texts_in_any_batch(packed):
    """A tokenizer without BOS gives an empty text no token at all: a batch of only such
    texts (batch_size=1, say) still runs, and they pool to 0 (it failed in the model)."""
    enc = make_encoder(bos=False, packed=packed)
    inputs = ["", texts_of(1, seed=4)[0], "", [INSTR, ""]]
    for bs in (1, 2, 4):
        got = enc.encode(inputs, batch_size=bs, show_progress_bar=False)
        assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[2], got[0])
        assert_matches_oracle(enc, inputs[1:2], got[1:2])
    only = enc.encode(["", ""], batch_size=2, show_progress_bar=False)
    assert only.shape == (2, enc.model.config.hidden_size) and not only.any()


def test_packed_on_an_unpatched_model_pads_with_a_warning():
    """packed=True on a causal (unpatched) model: its attention ignores sequence boundaries
    in a packed row, so the encoder pads instead (it let texts attend to earlier ones)."""
    enc = make_encoder(bidirectional=False, packed=True)
    inputs = texts_of(4, seed=12)
    _dispatch._WARNED.discard("encoder-packed-unpatched")
    with pytest.warns(RuntimeWarning, match="packed=True needs a model patched"):
        got = enc.encode(inputs, batch_size=4, show_progress_bar=False)
    assert_matches_oracle(enc, inputs, got)


def test_encode_restores_each_modules_mode():
    """encode runs in eval mode and leaves every module as it found it (dropout of a
    training loop that evaluates with encode stays on)."""
    enc = make_encoder()
    enc.model.train()
    frozen = enc.model.layers[0]
    frozen.eval()
    before = [(n, m.training) for n, m in enc.model.named_modules()]
    enc.encode(texts_of(3, seed=1), show_progress_bar=False)
    assert [(n, m.training) for n, m in enc.model.named_modules()] == before
    assert enc.model.training and not frozen.training


def test_save_then_load_keeps_a_causal_encoder_causal(tmp_path):
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.hf.patch import is_patched

    tok = get_tokenizer()
    tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    enc = LLM2Vec.from_pretrained(str(tmp_path / "base"), enable_bidirectional=False)
    inputs = texts_of(3, seed=6)
    before = enc.encode(inputs, show_progress_bar=False)
    enc.save(str(tmp_path / "causal"))
    loaded = LLM2Vec.from_pretrained(str(tmp_path / "causal"))
    assert not is_patched(loaded.model)
    assert torch.equal(loaded.encode(inputs, show_progress_bar=False), before)
    # an explicit argument still wins over the saved setting
    assert is_patched(LLM2Vec.from_pretrained(str(tmp_path / "causal"), enable_bidirectional=True).model)
    # an encoder built around an unpatched model (not by from_pretrained) saves as causal too
    built = LLM2Vec(loaded.model, tok)
    built.save(str(tmp_path / "built"))
    assert not is_patched(LLM2Vec.from_pretrained(str(tmp_path / "built")).model)


def _lora(seed):
    from peft import LoraConfig

    torch.manual_seed(seed)
    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _saved_base_and_adapter(tmp_path, adapter: str) -> None:
    """A tiny base model with its tokenizer in ``tmp_path/base`` and a LoRA adapter over it
    (``_lora(1)``) in ``tmp_path/<adapter>``."""
    from peft import get_peft_model

    tok = get_tokenizer()
    base = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    get_peft_model(base, _lora(1)).save_pretrained(tmp_path / adapter)


def test_save_an_adapter_over_an_adapter_merged_at_load(tmp_path):
    """The SimCSE flow: the MNTP adapter merged at load, a fresh adapter trained on top and
    saved unmerged. The folder records the merged adapter, so it loads back the same
    (it recorded only the base, and the MNTP weights were lost)."""
    from peft import get_peft_model

    from llm2vec_fast import LLM2Vec

    _saved_base_and_adapter(tmp_path, "mntp")
    enc = LLM2Vec.from_pretrained(str(tmp_path / "base"), peft_model_name_or_path=str(tmp_path / "mntp"),
                                  merge_peft=True)
    enc.model = get_peft_model(enc.model, _lora(2))
    inputs = texts_of(4, seed=8)
    before = enc.encode(inputs, show_progress_bar=False)
    enc.save(str(tmp_path / "simcse"))
    loaded = LLM2Vec.from_pretrained(str(tmp_path / "simcse"))
    torch.testing.assert_close(loaded.encode(inputs, show_progress_bar=False), before, rtol=0, atol=1e-5)
    # and once more: an adapter saved over that folder's (adapter-only) model
    loaded.model = get_peft_model(loaded.model, _lora(3))
    before2 = loaded.encode(inputs, show_progress_bar=False)
    loaded.save(str(tmp_path / "third"))
    again = LLM2Vec.from_pretrained(str(tmp_path / "third")).encode(inputs, show_progress_bar=False)
    torch.testing.assert_close(again, before2, rtol=0, atol=1e-5)


def test_save_a_peft_model_with_an_unknown_base_writes_merged_weights(tmp_path):
    from peft import get_peft_model

    from llm2vec_fast import LLM2Vec, patch_model

    tok = get_tokenizer()
    model = patch_model(get_peft_model(tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512),
                                       _lora(4)), backend="torch")
    model.peft_config["default"].base_model_name_or_path = None
    enc = LLM2Vec(model, tok)
    inputs = texts_of(3, seed=2)
    before = enc.encode(inputs, show_progress_bar=False)
    _dispatch._WARNED.discard("encoder-save-unknown-base")
    with pytest.warns(RuntimeWarning, match="base model is unknown"):
        enc.save(str(tmp_path / "out"))
    assert hasattr(enc.model, "peft_config"), "the encoder's own model stays unmerged"
    loaded = LLM2Vec.from_pretrained(str(tmp_path / "out"))
    torch.testing.assert_close(loaded.encode(inputs, show_progress_bar=False), before, rtol=0, atol=1e-5)


def test_bf16_model_embeddings_are_the_fp32_sums():
    """A bf16 model's vectors are the pooled fp32 sums, not rounded to bf16 first."""
    from llm2vec_fast.kernels import reference as ref

    enc = make_encoder()
    enc.model.to(torch.bfloat16)
    texts = texts_of(3, seed=13)
    got = enc.encode(texts, show_progress_bar=False)
    feats = enc.tokenize(texts)
    with torch.no_grad():
        hidden = enc.model(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"],
                           position_ids=feats["position_ids"]).last_hidden_state
    want = ref.pool_ref(hidden.double(), feats["attention_mask"], feats["embed_mask"], "mean")
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() < 1e-5 * want.abs().max()  # bf16 rounding is ~4e-3


def test_an_adapter_folder_written_by_save_loads_as_peft_over_its_base(tmp_path):
    """``from_pretrained(base, peft_model_name_or_path=folder)`` on a folder written by save()
    (or by MNTP training): only the folder's encoder settings apply; its adapter_only /
    base_model_name_or_path / merged_adapters describe its own weights, not the model named
    (they made ``base`` be read as an adapter folder, which failed)."""
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.hf.patch import is_patched

    _saved_base_and_adapter(tmp_path, "adapter")
    enc = LLM2Vec.from_pretrained(str(tmp_path / "base"), peft_model_name_or_path=str(tmp_path / "adapter"),
                                  pooling_mode="last_token", enable_bidirectional=False)
    inputs = texts_of(4, seed=9)
    before = enc.encode(inputs, show_progress_bar=False)
    enc.save(str(tmp_path / "saved"))  # adapter_only, names base
    loaded = LLM2Vec.from_pretrained(str(tmp_path / "base"), peft_model_name_or_path=str(tmp_path / "saved"))
    assert loaded.pooling_mode == "last_token" and not is_patched(loaded.model)  # the folder's settings
    torch.testing.assert_close(loaded.encode(inputs, show_progress_bar=False), before, rtol=0, atol=1e-5)
    # the loaded encoder saves (and reloads) as base + that adapter
    loaded.save(str(tmp_path / "again"))
    again = LLM2Vec.from_pretrained(str(tmp_path / "again")).encode(inputs, show_progress_bar=False)
    torch.testing.assert_close(again, before, rtol=0, atol=1e-5)


def test_eos_token_pooling_takes_the_eos_after_a_trailing_special_token():
    """A tokenizer whose template ends a text with a special token other than EOS (a [SEP]):
    the appended EOS comes after it, and eos_token pooling took the [SEP] state (the span
    assumed the EOS right after the text)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from llm2vec_fast import LLM2Vec, patch_model

    tok = copy.deepcopy(get_tokenizer())
    sep = tok.pad_token or tok.eos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {sep}", special_tokens=[(sep, tok.convert_tokens_to_ids(sep))])
    model = patch_model(tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512), backend="torch").eval()
    enc = LLM2Vec(model, tok, pooling_mode="eos_token")
    for pair in (("", "a dog runs in the park"), ("Represent:", "two cats")):
        ids, st, en = enc._tokenize_items([pair])
        seq = ids[0]
        assert seq[-1] == tok.eos_token_id and seq[-2] == tok.convert_tokens_to_ids(sep) and en[0] == len(seq)
        got = enc.encode([list(pair) if pair[0] else pair[1]], show_progress_bar=False)[0]
        with torch.no_grad():
            h = model(input_ids=torch.tensor([seq])).last_hidden_state[0]
        torch.testing.assert_close(got, h[-1], rtol=0, atol=1e-5)

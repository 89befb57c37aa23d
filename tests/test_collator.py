"""MNTP and contrastive collators: selection rate, the 80/10/10 split, special tokens, the shift."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm2vec_fast.training.collators import ContrastiveCollator, MNTPCollator, resolve_mask_token
from llm2vec_fast.training.toy import toy_model, toy_texts, toy_tokenizer


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def _examples(tok, n, seed=0):
    return [{"input_ids": ids} for ids in tok(toy_texts(n, seed=seed, max_words=20))["input_ids"]]


def _within(count, n, p, sigmas=5.0):
    """|count - n p| within ``sigmas`` binomial standard deviations."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("p", [0.15, 0.2, 0.5])
def test_mntp_statistics_80_10_10(tok, p):
    mask_id = resolve_mask_token(tok, "_", None)
    coll = MNTPCollator(tok, mask_id, mlm_probability=p)
    ex = _examples(tok, 600, seed=int(p * 100))
    orig_ids = [e["input_ids"] for e in ex]
    out = coll(ex)
    ids, mask, labels = out["input_ids"], out["attention_mask"], out["labels"]
    assert out["num_labelled"] == int((labels[:, 1:] != -100).sum()) == int((labels != -100).sum())
    T = ids.shape[1]
    orig = torch.full_like(ids, tok.pad_token_id)
    for i, o in enumerate(orig_ids):
        orig[i, : len(o)] = torch.tensor(o)
        assert int(mask[i].sum()) == len(o)
    sel = labels != -100
    special = torch.isin(orig, torch.tensor(tok.all_special_ids)) | (mask == 0)
    eligible = ~special
    eligible[:, 0] = False
    # special tokens (BOS at position 0, padding) and position 0 are never selected
    assert not (sel & ~eligible).any()
    assert (ids[special] == orig[special]).all(), "special or padding tokens were modified"
    assert (ids[~sel] == orig[~sel]).all(), "an unselected token was modified"
    # labels hold the original ids at selected positions
    assert (labels[sel] == orig[sel]).all()
    n_el, n_sel = int(eligible.sum()), int(sel.sum())
    assert n_el > 3000
    assert _within(n_sel, n_el, p), f"selection rate {n_sel / n_el:.3f}, expected {p}"
    is_mask = sel & (ids == mask_id)
    kept = sel & (ids == orig)
    randomised = sel & (ids != orig) & (ids != mask_id)
    # a random replacement equals the original token with probability 1/|pool|: count it as kept
    pool = len(coll.random_pool)
    assert _within(int(is_mask.sum()), n_sel, 0.8)
    assert _within(int(randomised.sum()), n_sel, 0.1 * (1 - 1 / pool))
    assert _within(int(kept.sum()), n_sel, 0.1 + 0.1 / pool)
    # random replacements are never special tokens
    assert not torch.isin(ids[randomised], torch.tensor(tok.all_special_ids)).any()
    assert ids.shape == labels.shape == mask.shape == (600, T)


def test_mntp_all_mask_and_generator(tok):
    coll = MNTPCollator(tok, 2, mlm_probability=0.3, mask_strategy="all", generator=torch.Generator().manual_seed(3))
    ex = _examples(tok, 200)
    out = coll(ex)
    sel = out["labels"] != -100
    assert sel.any()
    assert (out["input_ids"][sel] == 2).all()
    coll.generator.manual_seed(3)
    again = coll(ex)
    assert torch.equal(again["labels"], out["labels"]), "a reseeded generator must give the same masks"


def test_mntp_collator_rejects_bad_settings(tok):
    with pytest.raises(ValueError, match="mlm_probability"):
        MNTPCollator(tok, 5, mlm_probability=0.0)
    with pytest.raises(ValueError, match="mask_strategy"):
        MNTPCollator(tok, 5, mask_strategy="90-5-5")


def test_mask_token_choices(tok):
    assert resolve_mask_token(tok, "_", None) == tok.convert_tokens_to_ids("_")
    assert resolve_mask_token(tok, "eos", None) == tok.eos_token_id
    t2 = toy_tokenizer()
    m = toy_model(True)
    v0 = m.get_input_embeddings().weight.shape[0]
    mid = resolve_mask_token(t2, "mask", m)
    assert mid == v0 and t2.convert_ids_to_tokens(mid) == "<mask>"
    assert m.get_input_embeddings().weight.shape[0] == v0 + 1
    assert mid in t2.all_special_ids
    with pytest.raises(ValueError, match="mask_token"):
        resolve_mask_token(tok, "[MASK]", None)


def test_mntp_loss_is_shifted_by_one(tok):
    """The loss predicts labels[:, t] from the hidden state at t - 1: compare with full logits."""
    from llm2vec_fast.hf.patch import patch_model
    from llm2vec_fast.training.trainers import MNTPModel

    model = patch_model(toy_model(True, seed=5, initializer_range=0.5)).eval()  # sharp logits
    coll = MNTPCollator(tok, tok.convert_tokens_to_ids("_"), mlm_probability=0.3)
    batch = coll(_examples(tok, 16, seed=9))
    with torch.no_grad():
        out = MNTPModel(model, backend="torch")(**batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    lab = batch["labels"]
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100)
    unshifted = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100)
    assert abs(float(out["loss"]) - float(want)) < 1e-4
    assert abs(float(unshifted) - float(want)) > 1e-2, "test cannot tell the shift apart"
    sel = lab[:, 1:] != -100
    acc = (logits[:, :-1].argmax(-1)[sel] == lab[:, 1:][sel]).double().mean()
    assert abs(float(out["accuracy"]) - float(acc)) < 1e-6



@pytest.mark.parametrize("seeded", [True, False], ids=["mask_seed", "generator"])
def test_packed_batch_is_the_padded_one_without_its_padding(tok, seeded):
    ex = _examples(tok, 12, seed=3)
    if seeded:
        ex = [dict(e, mask_seed=100 + i) for i, e in enumerate(ex)]
    mask_id = tok.convert_tokens_to_ids("_")
    pad = MNTPCollator(tok, mask_id, 0.4, generator=torch.Generator().manual_seed(1))(ex)
    pk = MNTPCollator(tok, mask_id, 0.4, generator=torch.Generator().manual_seed(1), packed=True)(ex)
    keep = pad["attention_mask"].bool()
    assert set(pk) == {"input_ids", "labels", "position_ids", "num_labelled"}
    # the count the loss takes (no host sync to find the rows): every label, all kept by the shift
    n = int((pad["labels"] != -100).sum())
    assert pk["num_labelled"] == pad["num_labelled"] == n == int((pk["labels"][:, 1:] != -100).sum())
    assert isinstance(pk["num_labelled"], int)
    assert pk["input_ids"].shape == (1, int(keep.sum()))
    assert torch.equal(pk["input_ids"][0], pad["input_ids"][keep])
    assert torch.equal(pk["labels"][0], pad["labels"][keep])
    lengths = keep.sum(1).tolist()
    assert torch.equal(pk["position_ids"][0], torch.cat([torch.arange(n) for n in lengths]))
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    assert (pk["labels"][0, starts] == -100).all(), "a text's first token predicted from the text before it"
    assert (pk["labels"] != -100).sum() > 10


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_packed_mntp_loss_and_gradients_equal_padded(tok, backend):
    """One MNTP forward + backward on a packed batch equals the padded batch's: the texts
    attend only to themselves (the variable-length kernels), and the loss covers the same
    labelled tokens. Tolerance: the padded fp32 run's own distance from float64 (torch)."""
    from llm2vec_fast.hf.patch import patch_model
    from llm2vec_fast.training.trainers import MNTPModel

    if backend == "triton":
        pytest.importorskip("triton")
    ex = [dict(e, mask_seed=i) for i, e in enumerate(_examples(tok, 10, seed=4))]
    coll = MNTPCollator(tok, tok.convert_tokens_to_ids("_"), 0.3)
    pad, pk = coll(ex), MNTPCollator(tok, tok.convert_tokens_to_ids("_"), 0.3, packed=True)(ex)

    def run(batch, dtype, be):
        # head dim 32: one the Triton attention kernels take (the toy's 16 falls back)
        model = patch_model(toy_model(True, seed=5, initializer_range=0.3, head_dim=32).to(dtype), backend=be)
        out = MNTPModel(model, backend=be)(**batch)
        out["loss"].backward()
        return {k: float(v.detach()) for k, v in out.items()}, {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

    (ref, gref), (o_pad, g_pad), (o_pk, g_pk) = run(pad, torch.float64, "torch"), run(pad, torch.float32, backend), \
        run(pk, torch.float32, backend)
    assert set(g_pk) == set(g_pad) == set(gref) and len(gref) > 10
    loss_err = abs(o_pad["loss"] - ref["loss"])
    assert abs(o_pk["loss"] - ref["loss"]) <= 4 * loss_err + 1e-6
    assert o_pk["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-6)
    for n in gref:
        own = float((g_pad[n] - gref[n]).abs().max())
        scale = float(gref[n].abs().max())
        err = float((g_pk[n] - gref[n]).abs().max())
        assert err <= 4 * own + 1e-6 * scale, (n, err, own, scale)


def test_packed_batch_on_an_unpatched_model_is_refused(tok):
    from llm2vec_fast.training.trainers import MNTPModel

    pk = MNTPCollator(tok, tok.convert_tokens_to_ids("_"), 0.3, packed=True)(_examples(tok, 4))
    with pytest.raises(ValueError, match="position_ids: a packed batch .* patched by llm2vec_fast.patch_model"):
        MNTPModel(toy_model(True, seed=1), backend="torch")(**pk)

def test_contrastive_collator_simcse_and_supervised(tok):
    c = ContrastiveCollator(tok, mode="simcse", max_length=16)
    texts = toy_texts(5, seed=4)
    b = c([{"text": t} for t in texts])
    assert c.n_groups == 2
    assert b["input_ids"].shape[0] == 10
    assert torch.equal(b["input_ids"][:5], b["input_ids"][5:])
    assert (b["embed_mask"].bool() <= b["attention_mask"].bool()).all(), "padding inside the pooled region"

    s = ContrastiveCollator(tok, mode="supervised", max_length=32, hard_negatives=True)
    ex = [{"query": "a dog runs", "positive": "the dog is running", "negative": "a cat sits",
           "instruction": "find the same scene"},
          {"query": "a man eats food in the kitchen", "positive": "man eating", "negative": "a boat on the river",
           "instruction": "find the same scene"}]
    b = s(ex)
    assert s.n_groups == 3 and b["input_ids"].shape[0] == 6
    # query 0: <s> + 4 instruction words + 3 text words; only the text words are pooled
    q0 = b["embed_mask"][0].bool()
    ids = b["input_ids"][0][q0].tolist()
    assert tok.convert_ids_to_tokens(ids) == ["a", "dog", "runs"]
    assert int(b["attention_mask"][0].sum()) == 1 + 4 + 3
    # positives carry no instruction: every text token is pooled
    p0 = b["embed_mask"][2].bool()
    assert tok.convert_ids_to_tokens(b["input_ids"][2][p0].tolist()) == ["the", "dog", "is", "running"]
    s2 = ContrastiveCollator(tok, mode="supervised", hard_negatives=False)
    assert s2(ex)["input_ids"].shape[0] == 4 and s2.n_groups == 2
    with pytest.raises(ValueError, match="mode"):
        ContrastiveCollator(tok, mode="triplet")


def test_mask_seed_makes_masks_independent_of_the_batch(tok):
    """Examples with a mask_seed are masked the same whatever batch (or rank, or resume) they land in."""
    coll = MNTPCollator(tok, 5, mlm_probability=0.4)
    ex = [{"input_ids": e["input_ids"], "mask_seed": 100 + i} for i, e in enumerate(_examples(tok, 12, seed=2))]
    full = coll(ex)
    torch.rand(7)  # the global stream moves; seeded masks must not care
    part = coll(ex[5:9])
    n = part["labels"].shape[1]
    assert torch.equal(part["labels"], full["labels"][5:9, :n])
    assert torch.equal(part["input_ids"], full["input_ids"][5:9, :n])
    other = coll([{**e, "mask_seed": e["mask_seed"] + 1000} for e in ex])
    assert not torch.equal(other["labels"], full["labels"])


def test_added_special_tokens_are_never_selected_nor_drawn():
    """Tokens added with ``special=True`` but not in ``all_special_ids`` (SmolLM2's
    ``<repo_name>``..., Llama-3's reserved tokens) are specials for MNTP too."""
    from tokenizers import AddedToken

    t = toy_tokenizer()
    t.add_tokens([AddedToken("<repo_name>", special=True)])
    rid = t.convert_tokens_to_ids("<repo_name>")
    assert rid not in t.all_special_ids  # the case: only added_tokens_decoder says it is special
    coll = MNTPCollator(t, resolve_mask_token(t, "_", None), mlm_probability=0.5,
                        generator=torch.Generator().manual_seed(0))
    assert rid not in coll.random_pool.tolist()
    texts = [f"<repo_name> {x} <repo_name>" for x in toy_texts(200, seed=3, max_words=12)]
    batch = coll([{"input_ids": ids} for ids in t(texts)["input_ids"]])
    at = t(texts, padding=True, return_tensors="pt")["input_ids"] == rid
    assert at.sum() == 400 and (batch["labels"][at] == -100).all() and (batch["input_ids"][at] == rid).all()


def test_blank_mask_token_is_the_vocabulary_token():
    """``"_"`` means the vocabulary token ``_``, as the recipe's ``tokenizer.mask_token = "_"``;
    a SentencePiece-style tokenizer turns the *text* "_" into "▁_", another token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁_": 3, "_": 4, "▁a": 5}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    t = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert t("_", add_special_tokens=False)["input_ids"] == [3]
    assert resolve_mask_token(t, "_", None) == 4
    del vocab["_"]  # no such token: the text "_" when it is one token
    tk2 = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk2.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    t2 = PreTrainedTokenizerFast(tokenizer_object=tk2, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert resolve_mask_token(t2, "_", None) == 3


@pytest.mark.parametrize("mode", ["simcse", "supervised"])
def test_packed_contrastive_batch_is_the_padded_one_without_its_padding(tok, mode):
    ex = [dict(text=q, query=q, positive=p, negative=n, instruction="Find:") for q, p, n in
          zip(toy_texts(5, seed=1), toy_texts(5, seed=2), toy_texts(5, seed=3))]
    pad = ContrastiveCollator(tok, mode=mode, max_length=16)(ex)
    coll = ContrastiveCollator(tok, mode=mode, max_length=16, packed=True)
    pk = coll(ex)
    keep = pad["attention_mask"].bool()
    assert set(pk) == {"input_ids", "position_ids", "embed_mask", "cu_seqlens", "group_bounds"}
    for k in ("input_ids", "embed_mask"):
        assert torch.equal(pk[k][0], pad[k][keep]), k
    lengths = keep.sum(1)
    assert torch.equal(pk["position_ids"][0], torch.cat([torch.arange(int(n)) for n in lengths]))
    G = coll.n_groups
    assert pk["cu_seqlens"].shape == (G, 6) and pk["cu_seqlens"].dtype == torch.int32
    per_group = lengths.view(G, 5)
    assert torch.equal(pk["cu_seqlens"][:, 1:].long(), per_group.cumsum(1))
    assert pk["group_bounds"] == [0] + per_group.sum(1).cumsum(0).tolist()
    assert pk["group_bounds"][-1] == pk["input_ids"].shape[1]
    if mode == "supervised":  # instruction tokens attended to, not pooled
        assert (pk["embed_mask"][0, : int(lengths[0])] == 0).any()


def test_packed_contrastive_rows_on_an_unpatched_model_are_refused(tok):
    from llm2vec_fast.training.trainers import ContrastiveModel

    pk = ContrastiveCollator(tok, mode="simcse", max_length=16, packed=True)([{"text": t} for t in toy_texts(3)])
    with pytest.raises(ValueError, match="position_ids: a packed batch .* patched by llm2vec_fast.patch_model"):
        ContrastiveModel(toy_model(False, seed=1))(pk["input_ids"], position_ids=pk["position_ids"])


def _packed_vs_padded_on(dev, dtype, backend):
    """MNTP and SimCSE forward + backward on ``dev``: padded and packed batches in ``dtype`` with
    ``backend``, and the padded batch in float64 on the reference backend (the oracle). Returns
    ``{task: (padded errors, packed errors)}``, each the loss's and every gradient's max error."""
    import types

    from llm2vec_fast.hf.patch import patch_model
    from llm2vec_fast.training.trainers import ContrastiveModel, ContrastiveTrainer, MNTPModel

    tok = toy_tokenizer()
    ex = [dict(e, mask_seed=i) for i, e in enumerate(_examples(tok, 12, seed=6))]
    mask_id = tok.convert_tokens_to_ids("_")
    mntp = {p: MNTPCollator(tok, mask_id, 0.3, packed=p)(ex) for p in (False, True)}
    texts = [{"text": t} for t in toy_texts(10, seed=7)]
    simcse = {p: ContrastiveCollator(tok, mode="simcse", max_length=24, packed=p)(texts) for p in (False, True)}

    def run(task, packed, dt, be):
        causal = task == "mntp"
        base = toy_model(causal, seed=5, initializer_range=0.3, head_dim=64).to(device=dev, dtype=dt)
        model = patch_model(base, backend=be)
        batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in (mntp if causal else simcse)[packed].items()}
        if causal:
            loss = MNTPModel(model, backend=be)(**batch)["loss"]
        else:
            # scale 1: two identical views (no dropout) at the recipe's 20 give a loss of ~0, no gradient
            host = types.SimpleNamespace(n_groups=2, temperature=1.0, pooling_mode="mean", symmetric=False,
                                         cross_rank=False, loss_backend=be)
            host._groups = lambda t: ContrastiveTrainer._groups(host, t)
            hidden = ContrastiveModel(model)(**ContrastiveTrainer._model_inputs(batch))
            loss = ContrastiveTrainer.contrastive_loss_from_hidden(host, hidden, batch)
        loss.backward()
        return float(loss.detach()), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

    out = {}
    for task in ("mntp", "simcse"):
        ref_loss, ref_g = run(task, False, torch.float64, "torch")
        errs = []
        for packed in (False, True):
            loss, g = run(task, packed, dtype, backend)
            assert g.keys() == ref_g.keys()
            errs.append([abs(loss - ref_loss)] + [float((g[n] - ref_g[n]).abs().max()) for n in sorted(ref_g)])
        out[task] = errs
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_packed_training_steps_match_padded(dtype):
    """On CUDA (the Triton varlen attention, masked CE and packed pooling kernels): packed MNTP
    and SimCSE steps are within 3x the padded steps' own error from a float64 oracle, loss and
    every gradient."""
    for task, (padded, packed) in _packed_vs_padded_on(torch.device("cuda"), dtype, "auto").items():
        for i, (e_pad, e_pk) in enumerate(zip(padded, packed)):
            assert e_pk <= 3 * e_pad + 1e-6, (task, "loss" if i == 0 else f"gradient {i}", e_pk, e_pad)

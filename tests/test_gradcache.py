"""GradCache: chunked contrastive gradients equal direct gradients, with dropout on."""
from __future__ import annotations

import pytest
import torch

from llm2vec_fast.hf.patch import patch_model
from llm2vec_fast.training.collators import ContrastiveCollator
from llm2vec_fast.training.gradcache import RandContext, gradcache_step, packed_chunks, row_chunks
from llm2vec_fast.training.toy import toy_model, toy_texts, toy_tokenizer
from llm2vec_fast.training.trainers import ContrastiveTrainer, set_attention_dropout

from helpers import max_err


class _LossHost:
    """The trainer's loss methods without a Trainer (they only read these attributes)."""

    def __init__(self, n_groups, temperature=0.05, symmetric=False):
        self.n_groups, self.temperature, self.pooling_mode = n_groups, temperature, "mean"
        self.symmetric, self.cross_rank, self.loss_backend = symmetric, False, "torch"

    _groups = ContrastiveTrainer._groups
    _model_inputs = staticmethod(ContrastiveTrainer._model_inputs)
    contrastive_loss_from_hidden = ContrastiveTrainer.contrastive_loss_from_hidden
    contrastive_loss_from_embeddings = ContrastiveTrainer.contrastive_loss_from_embeddings
    encode_chunk = ContrastiveTrainer.encode_chunk


def _setup(dropout: float, n_groups=2, seed=0, dtype=torch.float64):
    from llm2vec_fast.training.trainers import ContrastiveModel

    tok = toy_tokenizer()
    model = patch_model(toy_model(False, seed=seed, initializer_range=0.3), backend="torch").to(dtype)
    set_attention_dropout(model, dropout)
    wrapper = ContrastiveModel(model).train()
    if n_groups == 2:
        coll = ContrastiveCollator(tok, mode="simcse", max_length=24)
        batch = coll([{"text": t} for t in toy_texts(7, seed=seed + 1, max_words=12)])
    else:
        coll = ContrastiveCollator(tok, mode="supervised", max_length=32, hard_negatives=True)
        q, p, n = (toy_texts(5, seed=seed + k) for k in (1, 2, 3))
        batch = coll([{"query": a, "positive": b, "negative": c, "instruction": "match the scene"}
                      for a, b, c in zip(q, p, n)])
    return wrapper, batch, _LossHost(n_groups)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _direct_chunked(wrapper, batch, host, mbs, seed):
    """Chunks embedded with autograd (same chunking, same random stream), loss backpropagated."""
    wrapper.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    emb = torch.cat([host.encode_chunk(wrapper, c) for c in row_chunks(batch, mbs)])
    loss = host.contrastive_loss_from_embeddings(emb)
    loss.backward()
    return float(loss), _grads(wrapper)


def _cached(wrapper, batch, host, mbs, seed):
    wrapper.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = gradcache_step(lambda c: host.encode_chunk(wrapper, c), batch, host.contrastive_loss_from_embeddings, mbs)
    return float(loss), _grads(wrapper)


def _compare(g_ref, g, tol):
    assert g_ref.keys() == g.keys() and len(g) > 10
    worst = max(max_err(g[k], g_ref[k]) / (g_ref[k].abs().max().item() + 1e-12) for k in g)
    assert worst <= tol, f"relative gradient error {worst:.2e} > {tol:.0e}"


@pytest.mark.parametrize("mbs", [2, 5])
@pytest.mark.parametrize("n_groups", [2, 3])
def test_gradcache_matches_direct_gradients_with_dropout(mbs, n_groups):
    wrapper, batch, host = _setup(dropout=0.3, n_groups=n_groups)
    l_ref, g_ref = _direct_chunked(wrapper, batch, host, mbs, seed=11)
    l_gc, g_gc = _cached(wrapper, batch, host, mbs, seed=11)
    assert abs(l_ref - l_gc) < 1e-10
    # fp64: both sides compute the same numbers in a different order
    _compare(g_ref, g_gc, 1e-9)
    # the check can fail: another random stream for the replay changes the gradients
    wrapper.zero_grad(set_to_none=True)
    torch.manual_seed(12)
    _, g_other = _direct_chunked(wrapper, batch, host, mbs, seed=12)
    with pytest.raises(AssertionError):
        _compare(g_ref, g_other, 1e-6)


def test_gradcache_without_dropout_equals_full_batch_pooled_loss():
    """No dropout: chunking changes nothing, and the cached path (pool + info_nce) equals the
    full-batch ``pooled_info_nce`` the trainer uses without GradCache."""
    wrapper, batch, host = _setup(dropout=0.0, n_groups=3, dtype=torch.float32)
    wrapper.zero_grad(set_to_none=True)
    hidden = wrapper(**host._model_inputs(batch))
    loss_full = host.contrastive_loss_from_hidden(hidden, batch)
    loss_full.backward()
    g_full = _grads(wrapper)
    l_gc, g_gc = _cached(wrapper, batch, host, 4, seed=0)
    assert abs(float(loss_full) - l_gc) < 1e-5
    _compare(g_full, g_gc, 1e-4)


def test_randcontext_replays_dropout():
    x = torch.ones(1000)
    st = RandContext()
    a = torch.nn.functional.dropout(x, 0.5)
    b = torch.nn.functional.dropout(x, 0.5)
    with st.replay():
        c = torch.nn.functional.dropout(x, 0.5)
    d = torch.nn.functional.dropout(x, 0.5)
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert not torch.equal(d, a), "replay must not rewind the caller's random stream"


def test_gradcache_embeddings_keep_the_fp32_sums_of_bf16_hidden_states():
    """``encode_chunk`` (GradCache's embeddings) pools bf16 hidden states into unrounded fp32
    sums, as the direct path's ``pooled_info_nce`` does: both losses are the same number."""
    wrapper, batch, host = _setup(dropout=0.0, n_groups=3, dtype=torch.bfloat16)
    with torch.no_grad():
        hidden = wrapper(**host._model_inputs(batch))
        emb = host.encode_chunk(wrapper, batch)
        direct = host.contrastive_loss_from_hidden(hidden, batch)
    assert hidden.dtype == torch.bfloat16 and emb.dtype == torch.float32
    from llm2vec_fast.kernels import reference as ref

    want = ref.pool_ref(hidden.double(), batch["attention_mask"], batch["embed_mask"], "mean")
    assert max_err(emb, want) < 1e-6 * (want.abs().max().item() + 1)
    assert abs(float(host.contrastive_loss_from_embeddings(emb)) - float(direct)) < 1e-5


def test_gradcache_scales_a_short_accumulation_window_like_the_trainer(tmp_path):
    """The epoch's last accumulation window may hold fewer batches than
    ``gradient_accumulation_steps``; Trainer divides by the window's size, and so must the
    GradCache step (it divided by the configured count)."""
    from transformers import TrainingArguments

    wrapper, batch, _ = _setup(dropout=0.0, n_groups=2, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=4, use_cpu=True, report_to=[])
    grads = {}
    for mbs in (None, 3):
        tr = ContrastiveTrainer(model=wrapper, args=args, n_groups=2, mini_batch_size=mbs, cross_rank=False,
                                loss_backend="torch")
        tr.current_gradient_accumulation_steps = 1  # set by Trainer's loop: this window holds one batch
        wrapper.zero_grad(set_to_none=True)
        tr.training_step(wrapper, dict(batch))
        grads[mbs] = _grads(wrapper)
    _compare(grads[None], grads[3], 1e-4)


def test_gradcache_step_puts_the_optimizer_in_train_mode(tmp_path):
    """Trainer's step calls optimizer.train() (schedule-free optimizers refuse to step in eval
    mode); the GradCache step replaced it without that call."""
    from transformers import TrainingArguments

    wrapper, batch, _ = _setup(dropout=0.0, n_groups=2, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    calls = {}
    for mbs in (None, 3):
        tr = ContrastiveTrainer(model=wrapper, args=args, n_groups=2, mini_batch_size=mbs, cross_rank=False,
                                loss_backend="torch")
        opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
        opt.train = lambda: calls.__setitem__(mbs, calls.get(mbs, 0) + 1)
        tr.optimizer = opt
        tr.current_gradient_accumulation_steps = 1  # set by Trainer's loop
        tr.training_step(wrapper, dict(batch))
    assert calls == {None: 1, 3: 1}



def _pack(batch, n_groups):
    """The packed form of a padded collator batch (what ContrastiveCollator(packed=True) returns)."""
    c = ContrastiveCollator.__new__(ContrastiveCollator)
    c.mode, c.hard_negatives = ("simcse", False) if n_groups == 2 else ("supervised", True)
    return c._pack(dict(batch))


@pytest.mark.parametrize("mbs", [2, 5])
@pytest.mark.parametrize("n_groups", [2, 3])
def test_packed_gradcache_equals_the_padded_full_batch(mbs, n_groups):
    """A packed batch through GradCache, chunked by texts (chunks of 2 and 5 cross the groups'
    bounds): the padded full batch's loss and gradients (fp64, no dropout)."""
    wrapper, batch, host = _setup(dropout=0.0, n_groups=n_groups)
    wrapper.zero_grad(set_to_none=True)
    loss_full = host.contrastive_loss_from_hidden(wrapper(**host._model_inputs(batch)), batch)
    loss_full.backward()
    g_full = _grads(wrapper)
    packed = _pack(batch, n_groups)
    chunks = packed_chunks(packed, mbs)
    assert sum(int(c["cu_seqlens"].numel()) - 1 for c in chunks) == batch["input_ids"].shape[0]
    assert sum(c["input_ids"].shape[1] for c in chunks) == int(batch["attention_mask"].sum())
    l_gc, g_gc = _cached(wrapper, packed, host, mbs, seed=0)
    assert abs(float(loss_full) - l_gc) < 1e-10
    _compare(g_full, g_gc, 1e-9)

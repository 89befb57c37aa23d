"""Model wrappers and ``transformers.Trainer`` subclasses for MNTP and contrastive training.

Shapes: ``B`` examples, ``T`` tokens, ``C`` hidden size, ``V`` vocabulary, ``G`` row groups
of a contrastive batch (``G * B`` rows, group-major: queries / first views first).

The Trainer receives a small ``nn.Module`` wrapper whose ``forward`` goes through the whole
computation that needs gradients, so DDP (``torchrun``, ``accelerate launch``) wraps and
synchronises it like any model. The losses come from the package's ops:
:func:`llm2vec_fast.masked_linear_cross_entropy` (MNTP: labelled rows only reach the LM
head) and :func:`llm2vec_fast.pooled_info_nce` / :func:`llm2vec_fast.info_nce`
(contrastive; pooling over valid, non-instruction tokens only, never padding).
"""
from __future__ import annotations

import json
import math
import os
import time

import torch
from torch import nn
from transformers import Trainer

from ..hf.mntp import lm_head_operands, per_item
from ..hf.patch import is_patched
from ..ops.info_nce import info_nce, pool, pooled_info_nce
from ..ops.masked_ce import masked_linear_cross_entropy
from .gradcache import gradcache_step


def unwrap_peft(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class MNTPModel(nn.Module):
    """An ``XForCausalLM`` (optionally peft-wrapped) computing the MNTP loss and accuracy.

    ``forward(input_ids (B, T), attention_mask (B, T), labels (B, T))`` (or a packed batch:
    ``(1, N)`` ids, labels and ``position_ids``, no mask; see ``MNTPCollator``) returns
    ``{"loss": 0-d fp32, "accuracy": 0-d fp32}``: ``labels[:, t]`` is predicted from the
    final hidden state at ``t - 1`` by the fused masked cross-entropy; no ``(B, T, V)``
    logits exist. The loss is the mean over labelled tokens, or with ``num_items_in_batch``
    (Trainer's count of the step's labelled tokens, over its accumulation window and, with
    ``average_tokens_across_devices``, every rank) their sum divided by it, so each labelled
    token weighs the same whatever micro-batch or rank holds it (Trainer counts
    ``labels != -100``; the collators never label position 0, which no hidden state predicts).
    ``num_labelled``: the batch's count of labels, from the collator (host-side), so the loss
    runs without a host sync.
    """

    accepts_loss_kwargs = True  # read by Trainer: it then counts and passes num_items_in_batch

    def __init__(self, model, backend: str = "auto"):
        super().__init__()
        self.model = model
        self.backend = backend
        # FSDP's auto-wrap policy reads the decoder-layer class names from here
        self._no_split_modules = getattr(unwrap_peft(model), "_no_split_modules", None)

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, num_items_in_batch=None,
                num_labelled=None):
        if labels is None:
            raise ValueError("labels: MNTPModel needs the (B, T) labels MNTPCollator makes, got None")
        hf = unwrap_peft(self.model)
        _check_packed_on_patched(hf, attention_mask, position_ids)
        out = hf.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        # the head in the dtype transformers' would run it (the autocast dtype under bf16=True)
        hidden, weight, bias = lm_head_operands(out.last_hidden_state, hf.get_output_embeddings())
        loss, acc = masked_linear_cross_entropy(
            hidden, weight, labels, bias, shift=1, return_accuracy=True, backend=self.backend,
            reduction="mean" if num_items_in_batch is None else "sum",
            softcap=getattr(hf.config, "final_logit_softcapping", None), num_labelled=num_labelled,
        )
        if num_items_in_batch is not None:
            loss = per_item(loss, num_items_in_batch)
        return {"loss": loss, "accuracy": acc}


class ContrastiveModel(nn.Module):
    """A base transformer (``XModel``, optionally peft-wrapped) returning final hidden states.

    ``forward(input_ids, attention_mask, position_ids)`` (all ``(R, T)``; or a packed row:
    ``(1, N)`` ids and positions, no mask) returns ``(R, T, C)``; pooling and the loss happen
    in the trainer, so the GradCache path can pool chunks on their own.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(unwrap_peft(model), "_no_split_modules", None)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        _check_packed_on_patched(self.model, attention_mask, position_ids)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state


def _check_packed_on_patched(model, attention_mask, position_ids):
    if attention_mask is None and position_ids is not None and not is_patched(model):
        # transformers' own attention would let a packed row's texts attend to each other
        raise ValueError("position_ids: a packed batch (no attention_mask) needs a model patched by "
                         "llm2vec_fast.patch_model, which attends within each text")


def _dedup_shared(state_dict: dict) -> dict:
    """Clone tensors that share storage (tied embeddings) so safetensors can write them."""
    seen: set = set()
    out = {}
    for k, v in state_dict.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        elif key is not None:
            seen.add(key)
        out[k] = v
    return out


class _BaseTrainer(Trainer):
    """What both stages share: a sequential sampler over pre-arranged data, safe checkpoint
    writing of tied weights, and throughput fields in every log line (also appended as JSON
    lines to ``<output_dir>/train_log.jsonl`` by the main process)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._token_sum = None  # attention-mask tokens seen, summed on the inputs' device
        self._row_sum = None  # rows of packed batches, summed on the device
        self._token_count = self._row_count = 0  # what the shapes tell (no mask: every token real)
        self._last_log = (time.perf_counter(), 0, 0)

    @property
    def _tokens(self) -> int:
        """Tokens seen so far: reads the device sum (a host sync, at log time only)."""
        return self._token_count + (0 if self._token_sum is None else int(self._token_sum))

    @property
    def _samples(self) -> int:
        """Rows (texts) seen so far; a packed row holds several (a host sync, at log time)."""
        return self._row_count + (0 if self._row_sum is None else int(self._row_sum))

    def _get_train_sampler(self, *args, **kwargs):
        # The datasets are arranged so that consecutive global batches are the intended ones
        # (one dataset per batch, a seeded shuffle): read them in order.
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def _save(self, output_dir=None, state_dict=None):
        if state_dict is None:
            state_dict = self.model.state_dict()
        super()._save(output_dir, state_dict=_dedup_shared(state_dict))

    def _count(self, inputs):
        # Summed where the mask lives, read only when a log line wants it: int() here was a
        # host sync at every step, draining the GPU's queue before the step's first kernel.
        mask, ids = inputs.get("attention_mask"), inputs["input_ids"]
        if mask is not None:
            n = mask.sum()
            self._token_sum = n if self._token_sum is None else self._token_sum + n
            self._row_count += int(ids.shape[0])
            return
        self._token_count += ids.numel()
        pos = inputs.get("position_ids")
        if pos is None:  # no mask, no positions: one full sequence per row
            self._row_count += int(ids.shape[0])
            return
        n = (pos == 0).sum()  # a packed row: a text starts where its positions restart
        self._row_sum = n if self._row_sum is None else self._row_sum + n

    def log(self, logs, *args, **kwargs):
        now = time.perf_counter()
        t0, tok0, s0 = self._last_log
        if "loss" in logs and now > t0:
            dt = now - t0
            tokens = self._tokens  # one device read per log line
            logs["tokens_per_second"] = round((tokens - tok0) / dt, 1)
            logs["rows_per_second"] = round((self._samples - s0) / dt, 2)
            self._last_log = (now, tokens, self._samples)
        super().log(logs, *args, **kwargs)
        if self.is_world_process_zero() and self.args.output_dir:
            # training has started, so every input check has passed: the folder may exist now
            os.makedirs(self.args.output_dir, exist_ok=True)
            rec = {"step": self.state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            with open(os.path.join(self.args.output_dir, "train_log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")


class MNTPTrainer(_BaseTrainer):
    """Trainer for :class:`MNTPModel`; ``evaluate`` reports loss and masked-token accuracy
    averaged over labelled tokens (masks from each row's ``mask_seed``, else from a generator
    reseeded per evaluation); under DDP each rank evaluates its share of the rows."""

    def __init__(self, *args, eval_collator=None, eval_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        self.eval_seed = eval_seed

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._count(inputs)
        if num_items_in_batch is None:
            out = model(**inputs)
        else:
            out = model(**inputs, num_items_in_batch=num_items_in_batch)
            if getattr(self.args, "average_tokens_across_devices", False):
                # As Trainer.compute_loss: the count spans every rank and DDP averages the
                # ranks' gradients, so each rank's share is scaled back up by their number.
                out["loss"] = out["loss"] * self.accelerator.num_processes
        return (out["loss"], out) if return_outputs else out["loss"]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            return {}
        if self.eval_collator is not None and self.eval_collator.generator is not None:
            self.eval_collator.generator.manual_seed(self.eval_seed)
        if self.args.world_size > 1:  # each rank its share; the sums are reduced below
            dataset = torch.utils.data.Subset(dataset, range(self.args.process_index, len(dataset),
                                                             self.args.world_size))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.eval_collator or self.data_collator)
        model = self.model
        was_training = model.training
        model.eval()
        tot = torch.zeros(3, dtype=torch.float64, device=self.args.device)  # loss sum, correct, labelled
        with torch.no_grad():
            for batch in loader:
                batch = self._prepare_inputs(batch)
                n = (batch["labels"][:, 1:] != -100).sum().double()
                if n == 0:
                    continue
                with self.compute_loss_context_manager():
                    out = model(**batch)
                tot += torch.stack([out["loss"].double() * n, out["accuracy"].double() * n, n])
        if self.args.world_size > 1:
            tot = self.accelerator.reduce(tot, reduction="sum")
        model.train(was_training)
        n = max(float(tot[2]), 1.0)
        metrics = {f"{metric_key_prefix}_loss": float(tot[0]) / n, f"{metric_key_prefix}_accuracy": float(tot[1]) / n,
                   f"{metric_key_prefix}_labelled_tokens": int(tot[2])}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class ContrastiveTrainer(_BaseTrainer):
    """Trainer for :class:`ContrastiveModel`: SimCSE (``n_groups=2``: two dropout views) or
    supervised (``n_groups`` 2 or 3: queries, positives, hard negatives).

    With ``mini_batch_size`` set, each step runs :func:`gradcache_step`: embeddings in
    chunks without autograd, the loss and its gradient on the full batch, chunks re-run
    with autograd and the same random state.
    """

    def __init__(self, *args, n_groups: int = 2, temperature: float = 0.05, pooling_mode: str = "mean",
                 symmetric: bool = False, cross_rank: bool = True, mini_batch_size: int | None = None,
                 loss_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.n_groups = n_groups
        self.temperature = temperature
        self.pooling_mode = pooling_mode
        self.symmetric = symmetric
        self.cross_rank = cross_rank
        self.mini_batch_size = mini_batch_size
        self.loss_backend = loss_backend

    @staticmethod
    def _model_inputs(inputs):
        return {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}

    def _groups(self, t):
        B = t.shape[0] // self.n_groups
        return [t[g * B : (g + 1) * B] for g in range(self.n_groups)]

    def contrastive_loss_from_hidden(self, hidden, inputs):
        """``pooled_info_nce`` on hidden ``(G * B, T, C)`` with the batch's masks (or on a
        packed row's ``(1, N, C)``, each group its token range and text offsets)."""
        if "group_bounds" in inputs:
            h, em, b, cu = hidden[0], inputs["embed_mask"][0], inputs["group_bounds"], inputs["cu_seqlens"]
            hs = [h[b[g] : b[g + 1]] for g in range(self.n_groups)]
            es = [em[b[g] : b[g + 1]] for g in range(self.n_groups)]
            neg = dict(hidden_neg=hs[2], mask_neg=None, embed_mask_neg=es[2], cu_seqlens_neg=cu[2]) \
                if self.n_groups == 3 else {}
            return pooled_info_nce(
                hs[0], None, hs[1], None, embed_mask_q=es[0], embed_mask_d=es[1], cu_seqlens_q=cu[0],
                cu_seqlens_d=cu[1], **neg, temperature=self.temperature, pooling=self.pooling_mode,
                symmetric=self.symmetric, cross_rank=self.cross_rank, backend=self.loss_backend,
            )
        hs = self._groups(hidden)
        ms = self._groups(inputs["attention_mask"])
        em = inputs.get("embed_mask")
        es = self._groups(em) if em is not None else [None] * self.n_groups
        neg = dict(hidden_neg=hs[2], mask_neg=ms[2], embed_mask_neg=es[2]) if self.n_groups == 3 else {}
        return pooled_info_nce(
            hs[0], ms[0], hs[1], ms[1], embed_mask_q=es[0], embed_mask_d=es[1], **neg,
            temperature=self.temperature, pooling=self.pooling_mode, symmetric=self.symmetric,
            cross_rank=self.cross_rank, backend=self.loss_backend,
        )

    def contrastive_loss_from_embeddings(self, emb):
        """``info_nce`` on pooled embeddings ``(G * B, C)``."""
        es = self._groups(emb)
        return info_nce(es[0], es[1], es[2] if self.n_groups == 3 else None, temperature=self.temperature,
                        symmetric=self.symmetric, cross_rank=self.cross_rank, backend=self.loss_backend)

    def encode_chunk(self, model, chunk):
        """Pooled embeddings ``(r, C)`` (fp32 sums) of a chunk of rows (or of a packed chunk's
        texts, :func:`packed_chunks`)."""
        hidden = model(**self._model_inputs(chunk))
        # fp32 out of the pooling (not rounded to a 16-bit hidden dtype), as the direct path's loss.
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        if "cu_seqlens" in chunk:
            return pool(hidden[0], None, chunk["embed_mask"][0], mode=self.pooling_mode, cu_seqlens=chunk["cu_seqlens"],
                        backend=self.loss_backend, out_dtype=acc)
        return pool(hidden, chunk["attention_mask"], chunk.get("embed_mask"), mode=self.pooling_mode,
                    backend=self.loss_backend, out_dtype=acc)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._count(inputs)
        hidden = model(**self._model_inputs(inputs))
        loss = self.contrastive_loss_from_hidden(hidden, inputs)
        return (loss, {"loss": loss}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.mini_batch_size:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if callable(getattr(self.optimizer, "train", None)):  # as Trainer's step: schedule-free optimizers
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        self._count(inputs)
        # As Trainer.training_step: the epoch's last window may hold fewer batches.
        ga = max(int(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)), 1)
        no_sync = None
        if hasattr(model, "no_sync") and self.accelerator.sync_gradients:
            no_sync = model.no_sync  # DDP: all-reduce once, after the last chunk

        def encode(chunk):
            with self.compute_loss_context_manager():
                return self.encode_chunk(model, chunk)

        loss = gradcache_step(
            encode, inputs, self.contrastive_loss_from_embeddings, self.mini_batch_size,
            backward=self.accelerator.backward, no_sync=no_sync, loss_scale=1.0 / ga,
        )
        return loss / ga


def set_attention_dropout(model, p: float | None) -> list:
    """Set the attention dropout of every attention module (and the config); returns what
    to restore with :func:`restore_attention_dropout`. ``p=None`` changes nothing."""
    if p is None:
        return []
    saved = []
    hf = unwrap_peft(model)
    cfg = getattr(hf, "config", None)
    if cfg is not None and hasattr(cfg, "attention_dropout"):
        saved.append((cfg, cfg.attention_dropout))
        cfg.attention_dropout = p
    for m in hf.modules():
        if isinstance(getattr(m, "attention_dropout", None), float) and m is not cfg:
            saved.append((m, m.attention_dropout))
            m.attention_dropout = float(p)
    return saved


def restore_attention_dropout(saved: list) -> None:
    for obj, v in saved:
        obj.attention_dropout = v


def throughput_summary(trainer) -> dict:
    """Totals over the run (tokens, rows, seconds) from a finished trainer."""
    hist = [h for h in trainer.state.log_history if "train_runtime" in h]
    rt = hist[-1]["train_runtime"] if hist else float("nan")
    tokens = trainer._tokens
    return {"tokens": tokens, "rows": trainer._samples, "seconds": rt,
            "tokens_per_second": tokens / rt if rt and not math.isnan(rt) else float("nan")}

"""The three training stages end to end: check inputs, load, train on the Trainer, save.

``run_mntp`` / ``run_simcse`` / ``run_supervised`` take a config (see ``config.py``) and
write the final model to ``output_dir``. Every input check (data files, JSONL fields,
batch sizes, settings) runs before the model is loaded or anything is written, so a bad
input leaves no half-written output folder. ``train_mntp`` / ``train_contrastive`` are the
in-memory cores (used by the demo, which keeps one model across stages).

Outputs load with :meth:`llm2vec_fast.LLM2Vec.from_pretrained` (and ``eval-sts``):
full fine-tuning writes the weights; LoRA writes the adapter with the base model's name
recorded (an MNTP adapter is rewritten to apply to the base ``XModel``, so the SimCSE stage
loads it with ``--peft-model-name-or-path`` and merges it before adding a fresh LoRA).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import torch

from .collators import ContrastiveCollator, MNTPCollator, resolve_mask_token
from .config import ConfigError, MNTPConfig, SimCSEConfig, SupervisedConfig, config_to_dict
from .data import (
    ListDataset, arrange_batches, load_supervised, read_instructions, read_texts,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_FILE = "adapter_model.safetensors"


@contextlib.contextmanager
def _checks():
    """A ValueError raised inside (settings and input checks, before training starts) is a
    :class:`ConfigError`, which the train commands print as one line."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


# ----------------------------------------------------------------------------- models


def load_model(name_or_path: str, *, causal_lm: bool, dtype: str = "float32", peft_model_name_or_path=None):
    """(model, tokenizer): ``XForCausalLM`` or ``XModel`` with an adapter merged if given."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from ..models import resolve_model_name

    path, extra = resolve_model_name(name_or_path)
    tok_kwargs = {k: v for k, v in extra.items() if k == "gguf_file"}
    tokenizer = AutoTokenizer.from_pretrained(path, **tok_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = cls.from_pretrained(path, dtype=DTYPES[dtype], **extra)
    if peft_model_name_or_path:
        model = merge_adapter(model, peft_model_name_or_path)
    return model, tokenizer


def merge_adapter(model, adapter_path: str):
    """Apply a LoRA adapter to ``model`` and merge it into the weights.

    Adapters written by MNTP target the base ``XModel``; applied to an ``XForCausalLM`` they
    go to its ``base_model``.
    """
    from peft import PeftModel

    from ..models import resize_for_adapter

    resize_for_adapter(model, adapter_path)  # the whole model: its LM head grows too
    target = model
    if getattr(model, "base_model", model) is not model and _adapter_targets_base(adapter_path):
        target = model.base_model
    merged = PeftModel.from_pretrained(target, adapter_path).merge_and_unload()
    if target is not model:
        setattr(model, model.base_model_prefix, merged)
        return model
    return merged


def _adapter_targets_base(adapter_path: str) -> bool:
    from safetensors import safe_open

    f = os.path.join(adapter_path, ADAPTER_FILE)
    if not os.path.isfile(f):
        return True
    with safe_open(f, "pt") as s:
        return not any(k.startswith("base_model.model.model.") for k in s.keys())


def apply_lora(model, cfg):
    """Wrap ``model`` in a fresh peft LoRA (``cfg.lora_r``, ``lora_alpha``, ``lora_dropout``,
    ``lora_target_modules``); raises ValueError when no target module exists."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.lora_target_modules if t not in names]
    if len(missing) == len(cfg.lora_target_modules):
        raise ConfigError(f"lora_target_modules: none of {cfg.lora_target_modules} is a module of the model")
    targets = [t for t in cfg.lora_target_modules if t in names]
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    target_modules=targets, bias="none")
    return get_peft_model(model, lc)


def prepare_for_training(model, cfg):
    """Bidirectional attention, gradient checkpointing and LoRA (or all weights trainable)."""
    from ..hf.patch import patch_model

    patch_model(model, backend=cfg.backend)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg.use_lora:
        model = apply_lora(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        if cfg.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        if cfg.freeze_layers:
            layers = _decoder_layers(model)
            if cfg.freeze_layers >= len(layers):
                raise ConfigError(f"freeze_layers: expected fewer than the model's {len(layers)} layers, "
                                  f"got {cfg.freeze_layers}")
            for layer in layers[: cfg.freeze_layers]:
                for p in layer.parameters():
                    p.requires_grad_(False)
    return model


def _decoder_layers(model):
    base = model.base_model if getattr(model, "base_model", model) is not model else model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ConfigError("freeze_layers: the model has no .layers list of decoder layers")
    return list(layers)


# ----------------------------------------------------------------------------- Trainer args


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def end_distributed() -> None:
    """End a ``torchrun`` run cleanly: free what training left, wait for every rank, then
    destroy the process group. No-op outside a process group.

    Call it after the last use of the trainer, having dropped your references to it (and to
    its DDP-wrapped model). The order matters. A DDP wrapper's gradient reducer holds the
    process group from C++; if the group is destroyed first, the reducer holds the last
    reference, and freeing it later destroys the gloo group while the freeing thread holds the
    GIL: the group's destructor joins its worker threads, one of which may still be releasing
    a finished collective's tensors, which needs the GIL: a hang at exit (2 two-rank CPU runs
    in 21 where the test held its trainer). Freed here first (``gc.collect``: the Trainer sits in
    reference cycles), the group's last reference is its Python handle, whose destructor
    releases the GIL. The barrier keeps a rank that finishes early from tearing down
    communication another rank still uses.
    """
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    from torch.nn.parallel import DistributedDataParallel

    held = sum(issubclass(type(o), DistributedDataParallel) for o in gc.get_objects())  # type(): no __class__ lookups
    if held:
        import warnings

        warnings.warn(f"end_distributed: {held} DistributedDataParallel model(s) still referenced (a "
                      "trainer?); drop them before calling it, or the process may hang when they are "
                      "freed after the process group is gone", RuntimeWarning, stacklevel=2)
    dist.barrier()
    dist.destroy_process_group()


def training_arguments(cfg, *, save: bool = True, **extra):
    from transformers import TrainingArguments

    bf16 = cfg.bf16 if cfg.bf16 is not None else torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    kw = dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        fsdp=cfg.fsdp,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if (save and cfg.save_steps) else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bool(bf16),
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_drop_last=True,
        disable_tqdm=not cfg.progress,
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if (world_size() > 1 and not torch.cuda.is_available()) else None,
        use_cpu=not torch.cuda.is_available(),
    )
    kw.update(extra)
    with _checks():  # transformers' own checks of the settings (fsdp, optim, ...)
        return TrainingArguments(**kw)


def resolve_checkpoint(cfg) -> str | None:
    r = cfg.resume_from_checkpoint
    if r is None:
        return None
    if r == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(cfg.output_dir) if os.path.isdir(cfg.output_dir) else None
        if last is None:
            raise ConfigError(f"resume_from_checkpoint: no checkpoint-* folder in {cfg.output_dir!r}")
        return last
    if not os.path.isdir(r):
        raise ConfigError(f"resume_from_checkpoint: {r!r} is not a folder")
    return r


# ----------------------------------------------------------------------------- MNTP


def tokenize_texts(tokenizer, texts: list[str], max_length: int, group: bool) -> list[dict]:
    """Token lists of ``texts``: one row per text (truncated), or concatenated into
    ``max_length`` blocks (EOS between texts) when ``group``."""
    enc = tokenizer(texts, add_special_tokens=True, truncation=not group,
                    max_length=max_length if not group else None)["input_ids"]
    if not group:
        return [{"input_ids": ids} for ids in enc if len(ids) >= 2]
    eos = tokenizer.eos_token_id
    flat: list[int] = []
    for ids in enc:
        flat.extend(ids + ([eos] if eos is not None and (not ids or ids[-1] != eos) else []))
    return [{"input_ids": flat[i : i + max_length]} for i in range(0, len(flat) - 1, max_length)
            if len(flat[i : i + max_length]) >= 2]


def train_mntp(model, tokenizer, train_texts: list[str], cfg: MNTPConfig, *, eval_texts=None, save_checkpoints=True):
    """Train a patched-or-not ``XForCausalLM`` with MNTP in memory; returns ``(model, trainer)``.

    ``model`` gets bidirectional attention (and LoRA when ``cfg.use_lora``); the returned
    model is the trained one (a ``PeftModel`` with LoRA).
    """
    from transformers import set_seed

    from .trainers import MNTPModel, MNTPTrainer

    set_seed(cfg.seed)  # the new <mask> row and the LoRA weights are drawn here, before Trainer seeds
    with _checks():
        mask_id = resolve_mask_token(tokenizer, cfg.mask_token, model)
    model = prepare_for_training(model, cfg)
    rows = tokenize_texts(tokenizer, train_texts, cfg.max_seq_length, cfg.group_texts)
    block = cfg.per_device_batch_size * world_size() * cfg.gradient_accumulation_steps
    if len(rows) < block:
        raise ConfigError(f"per_device_batch_size: {block} texts per step but only {len(rows)} training rows")
    with _checks():
        arranged = arrange_batches({"train": rows}, block, cfg.max_steps, cfg.seed,
                                   length=(lambda r: len(r["input_ids"])) if cfg.group_by_length else None)
    # a seed per position: masks independent of ranks, batches and resumes
    train = ListDataset([{"input_ids": r["input_ids"], "mask_seed": cfg.seed * 1_000_003 + i}
                         for i, r in enumerate(arranged)])
    collator = MNTPCollator(tokenizer, mask_id, cfg.mlm_probability, cfg.mask_strategy, packed=cfg.packing)
    eval_ds = eval_coll = None
    if eval_texts:
        # seeds of their own too (negative: apart from the training rows'), so the masks, and
        # the metrics, do not depend on how evaluate() splits the rows over ranks and batches
        eval_ds = ListDataset([{"input_ids": r["input_ids"], "mask_seed": cfg.seed * 1_000_003 - 1 - i} for i, r in
                               enumerate(tokenize_texts(tokenizer, eval_texts, cfg.max_seq_length, cfg.group_texts))])
        eval_coll = MNTPCollator(tokenizer, mask_id, cfg.mlm_probability, cfg.mask_strategy,
                                 generator=torch.Generator().manual_seed(cfg.seed), packed=cfg.packing)
    extra = {}
    if eval_ds is not None and cfg.eval_steps:
        extra = dict(eval_strategy="steps", eval_steps=cfg.eval_steps)
    args = training_arguments(cfg, save=save_checkpoints, **extra)
    trainer = MNTPTrainer(model=MNTPModel(model, backend=cfg.backend), args=args, train_dataset=train,
                          eval_dataset=eval_ds, data_collator=collator, eval_collator=eval_coll, eval_seed=cfg.seed)
    trainer.train(resume_from_checkpoint=resolve_checkpoint(cfg))
    if eval_ds is not None:
        trainer.evaluate()
    return model, trainer


def check_output_dir(path: str, what: str = "output_dir") -> None:
    """ValueError unless ``path`` is a writable folder or one this process can create (under
    a writable folder, not under a file). Creates nothing: a refused run leaves no folder."""
    full = os.path.abspath(path)
    if os.path.exists(full):
        if not os.path.isdir(full):
            raise ValueError(f"{what}: {path!r} exists and is not a folder")
        if not os.access(full, os.W_OK | os.X_OK):
            raise ValueError(f"{what}: {path!r} is not writable")
        return
    parent = full
    while not os.path.lexists(parent):  # the nearest ancestor that exists (a file reads as none below it)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{what}: cannot create {path!r}: {parent!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot create {path!r}: {parent!r} is not writable")


# Tokens a grouped text can add beyond one per UTF-8 byte (see _check_mntp_inputs).
GROUP_EXTRA_TOKENS = 4


def _check_mntp_inputs(cfg: MNTPConfig):
    train = read_texts(cfg.train_file, "train_file") if cfg.train_file else None
    if train is None:
        raise ValueError("train_file: expected a .txt or .jsonl file of training texts")
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    evals = read_texts(cfg.validation_file, "validation_file") if cfg.validation_file else None
    if evals is None and cfg.validation_split_percentage > 0:
        n = max(1, int(len(train) * cfg.validation_split_percentage / 100))
        train, evals = train[n:], train[:n]
    # Before the model loads: the most training rows the texts can make must fill a step. A text
    # is at most one row; grouped, it is at most a token per UTF-8 byte (byte-level BPE, and
    # SentencePiece's byte fallback, never make more; a character can be several tokens) plus
    # a few more: BOS / EOS, the EOS put between texts, a SentencePiece word-start prefix.
    block = cfg.per_device_batch_size * world_size() * cfg.gradient_accumulation_steps
    most = len(train) if not cfg.group_texts else (
        sum(len(t.encode("utf-8")) + GROUP_EXTRA_TOKENS for t in train) // cfg.max_seq_length + 1)
    if most < block:
        raise ValueError(f"per_device_batch_size: {block} training rows per step, but {len(train)} training texts "
                         f"make at most {most}")
    resolve_checkpoint(cfg)
    return train, evals


def run_mntp(cfg: MNTPConfig) -> dict:
    """MNTP from files to a saved model. Returns the final metrics."""
    with _checks():
        cfg.validate()
        check_output_dir(cfg.output_dir)
        train, evals = _check_mntp_inputs(cfg)
    model, tok = load_model(cfg.model_name_or_path, causal_lm=True, dtype=cfg.dtype,
                            peft_model_name_or_path=cfg.peft_model_name_or_path)
    model, trainer = train_mntp(model, tok, train, cfg, eval_texts=evals)
    metrics = _final_metrics(trainer)
    if trainer.is_world_process_zero():
        save_mntp_output(model, tok, cfg)
        _write_json(os.path.join(cfg.output_dir, "train_config.json"), config_to_dict(cfg))
        _write_json(os.path.join(cfg.output_dir, "metrics.json"), metrics)
    return metrics


def save_mntp_output(model, tokenizer, cfg) -> None:
    """Write the MNTP result so both ``LLM2Vec.from_pretrained`` and the SimCSE stage load it.

    LoRA (and no adapter merged at load): the adapter, its keys rewritten to target the base
    ``XModel`` (``base_model.model.model.X`` -> ``base_model.model.X``), plus the encoder
    config naming the base model. Otherwise: the full ``XForCausalLM`` weights.
    """
    from ..encoder import CONFIG_NAME, _abs_if_dir

    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    is_peft = hasattr(model, "merge_and_unload")
    enc_cfg = {"pooling_mode": "mean", "max_length": 512, "doc_max_length": 400, "skip_instruction": True,
               "padding_side": tokenizer.padding_side or "right", "enable_bidirectional": True}
    if is_peft and not cfg.peft_model_name_or_path:
        # an added <mask> resized the embeddings: save them with the adapter (peft's "auto"
        # only notices a resize when it can read the base model's config)
        model.save_pretrained(out, **({"save_embedding_layers": True} if cfg.mask_token == "mask" else {}))
        _retarget_adapter_to_base(out)
        # a local base as an absolute path: the folder loads from any working directory
        enc_cfg.update(adapter_only=True, base_model_name_or_path=_abs_if_dir(cfg.model_name_or_path))
    else:
        from ..encoder import _save_pretrained_dequantized

        m = model.merge_and_unload() if is_peft else model
        _save_pretrained_dequantized(m, out)  # the default model comes from a GGUF file
    tokenizer.save_pretrained(out)
    _write_json(os.path.join(out, CONFIG_NAME), enc_cfg)


def _retarget_adapter_to_base(folder: str) -> None:
    from safetensors.torch import load_file, save_file

    f = os.path.join(folder, ADAPTER_FILE)
    sd = load_file(f)
    new = {}
    for k, v in sd.items():
        if k.startswith("base_model.model.model."):
            k = "base_model.model." + k[len("base_model.model.model."):]
        elif k.startswith("base_model.model.lm_head"):
            continue  # the head does not exist in the encoder
        new[k] = v
    save_file(new, f, metadata={"format": "pt"})


# ----------------------------------------------------------------------------- contrastive


def resolve_packing(cfg, model) -> bool:
    """Whether a stage packs its batches: ``cfg.packing`` when set; ``None`` (the contrastive
    stages' default) packs when ``model``'s attention is patched, which attends within each text
    of a packed row (transformers' own attention would let them see each other). On the H200 a
    packed SimCSE step took 0.76x the padded one's time (``benchmarks/PERFORMANCE.md``); MNTP,
    host-bound there, stays padded unless asked (``MNTPConfig.packing`` is False)."""
    if cfg.packing is not None:
        return bool(cfg.packing)
    from ..hf.patch import is_patched

    return is_patched(model)


def train_contrastive(model, tokenizer, examples, cfg, *, mode: str, datasets=None, save_checkpoints=True):
    """Train an ``XModel`` with SimCSE (``examples``: texts) or supervised contrastive
    (``datasets``: ``{name: rows}``) in memory; returns ``(model, trainer)``."""
    from transformers import set_seed

    from .trainers import ContrastiveModel, ContrastiveTrainer, restore_attention_dropout, set_attention_dropout

    set_seed(cfg.seed)  # the LoRA weights are drawn here, before Trainer seeds
    model = prepare_for_training(model, cfg)
    saved_dropout = set_attention_dropout(model, cfg.attention_dropout)
    hard = bool(getattr(cfg, "hard_negatives", False))
    collator = ContrastiveCollator(tokenizer, mode=mode, max_length=cfg.max_seq_length,
                                   pooling_mode=cfg.pooling_mode, hard_negatives=hard,
                                   packed=resolve_packing(cfg, model))
    block = cfg.per_device_batch_size * world_size() * cfg.gradient_accumulation_steps
    data = datasets if datasets is not None else {"train": [{"text": t} for t in examples]}
    length = None
    if cfg.group_by_length:  # characters of the longest text of the example: a cheap proxy for tokens
        length = lambda e: max(len(v) for k, v in e.items() if k != "instruction" and isinstance(v, str))  # noqa: E731
    with _checks():
        train = ListDataset(arrange_batches(data, block, cfg.max_steps, cfg.seed, length=length))
    args = training_arguments(cfg, save=save_checkpoints)
    trainer = ContrastiveTrainer(
        model=ContrastiveModel(model), args=args, train_dataset=train, data_collator=collator,
        n_groups=collator.n_groups, temperature=cfg.temperature, pooling_mode=cfg.pooling_mode,
        symmetric=cfg.symmetric, cross_rank=cfg.cross_rank, mini_batch_size=cfg.mini_batch_size,
        loss_backend=cfg.backend,
    )
    try:
        trainer.train(resume_from_checkpoint=resolve_checkpoint(cfg))
    finally:
        restore_attention_dropout(saved_dropout)
    return model, trainer


def _check_block(cfg, sizes: dict):
    block = cfg.per_device_batch_size * world_size() * cfg.gradient_accumulation_steps
    if all(n < block for n in sizes.values()):
        raise ValueError(f"per_device_batch_size: {block} examples per step but the data hold only {sizes}")


def run_simcse(cfg: SimCSEConfig) -> dict:
    with _checks():
        cfg.validate()
        check_output_dir(cfg.output_dir)
        if not cfg.train_file:
            raise ValueError("train_file: expected a .txt or .jsonl file of training texts")
        texts = read_texts(cfg.train_file, "train_file")
        if cfg.max_train_samples:
            texts = texts[: cfg.max_train_samples]
        _check_block(cfg, {"train": len(texts)})
        resolve_checkpoint(cfg)
    model, tok = load_model(cfg.model_name_or_path, causal_lm=False, dtype=cfg.dtype,
                            peft_model_name_or_path=cfg.peft_model_name_or_path)
    model, trainer = train_contrastive(model, tok, texts, cfg, mode="simcse")
    return _finish_contrastive(model, tok, cfg, trainer)


def run_supervised(cfg: SupervisedConfig) -> dict:
    with _checks():
        cfg.validate()
        check_output_dir(cfg.output_dir)
        instructions = read_instructions(cfg.instructions)
        data = load_supervised(cfg.train_files, instructions, require_negative=cfg.hard_negatives)
        if cfg.max_train_samples:
            data = {k: v[: cfg.max_train_samples] for k, v in data.items()}
        _check_block(cfg, {k: len(v) for k, v in data.items()})
        resolve_checkpoint(cfg)
    model, tok = load_model(cfg.model_name_or_path, causal_lm=False, dtype=cfg.dtype,
                            peft_model_name_or_path=cfg.peft_model_name_or_path)
    model, trainer = train_contrastive(model, tok, None, cfg, mode="supervised", datasets=data)
    return _finish_contrastive(model, tok, cfg, trainer)


def save_encoder(model, tokenizer, output_dir: str, *, pooling_mode: str = "mean", max_length: int = 512,
                 base_model_name_or_path: str | None = None, merged_adapters=(), merge: bool = False) -> None:
    """Save a trained ``XModel`` (or a peft model over one) as an :class:`LLM2Vec` folder.
    ``merged_adapters``: adapter folders merged into the base before training (recorded
    with an unmerged adapter, so the folder loads back as base + those + the adapter)."""
    from ..encoder import LLM2Vec, _abs_if_dir

    enc = LLM2Vec(model, tokenizer, pooling_mode=pooling_mode, max_length=max(max_length, 8),
                  doc_max_length=max(max_length, 8), padding_side="right")
    # a local base as an absolute path: an adapter-only folder loads from any working directory
    enc._weights_recipe = (_abs_if_dir(base_model_name_or_path), [_abs_if_dir(a) for a in merged_adapters], {})
    enc.save(output_dir, merge_before_save=merge)


def _finish_contrastive(model, tok, cfg, trainer) -> dict:
    metrics = _final_metrics(trainer)
    if trainer.is_world_process_zero():
        # A LoRA run writes its adapter only (MBs, not the model's GBs); the config names the
        # base and the adapter merged into it at load (MNTP's), which must stay where they are
        # (LLM2Vec.from_pretrained(out).save(dst, merge_before_save=True) makes a standalone copy)
        save_encoder(model, tok, cfg.output_dir, pooling_mode=cfg.pooling_mode, max_length=512,
                     base_model_name_or_path=cfg.model_name_or_path,
                     merged_adapters=[cfg.peft_model_name_or_path] if cfg.peft_model_name_or_path else [])
        _write_json(os.path.join(cfg.output_dir, "train_config.json"), config_to_dict(cfg))
        _write_json(os.path.join(cfg.output_dir, "metrics.json"), metrics)
    return metrics


def _final_metrics(trainer) -> dict:
    from .trainers import throughput_summary

    out = throughput_summary(trainer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        out["first_loss"], out["last_loss"] = losses[0], losses[-1]
    for h in trainer.state.log_history:
        for k, v in h.items():
            if k.startswith("eval_"):
                out[k] = v
    return out


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def remove_if_created(path: str, existed: bool) -> None:
    """Remove an output folder this run created (after a failure), never a pre-existing one."""
    if not existed and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)

"""Training configurations: one dataclass per stage, filled from a JSON/YAML file and flags.

Every field becomes a command-line flag (``learning_rate`` -> ``--learning-rate``); a
``--config file.{json,yaml}`` sets fields first and explicit flags override it. Values are
checked by :meth:`BaseConfig.validate` before anything is loaded or written.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A setting or input no run can use, found before training starts (the config and data
    checks, and the few that need the loaded model: LoRA targets, frozen layers, rows per
    step). The train commands print it as one line (exit status 2); any other error, and
    every error raised once training runs, keeps its traceback."""


@dataclass
class BaseConfig:
    """Fields shared by every stage (model, LoRA, optimisation, checkpoints)."""

    model_name_or_path: str = field(
        default="smollm2-135m", metadata={"help": "model folder / hub name; 'smollm2-135m' = the offline default"})
    peft_model_name_or_path: str | None = field(
        default=None, metadata={"help": "a LoRA adapter (e.g. the MNTP one) merged into the model before training"})
    output_dir: str = field(default="runs/train", metadata={"help": "checkpoints, logs and the final model"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype: float32 | bfloat16 | float16"})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 autocast (mixed precision); None = on for CUDA devices that support it"})
    backend: str = field(default="auto", metadata={"help": "attention / loss backend: auto | torch | triton"})
    use_lora: bool = field(default=True, metadata={"help": "train a LoRA adapter (peft) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS), metadata={"help": "module names LoRA wraps"})
    freeze_embeddings: bool = field(
        default=True, metadata={"help": "full fine-tuning: keep the token embeddings (and a tied LM head) frozen"})
    freeze_layers: int = field(
        default=0, metadata={"help": "full fine-tuning: freeze the bottom N decoder layers (backward stops above them)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per text after truncation"})
    per_device_batch_size: int = field(default=32, metadata={"help": "texts (or query groups) per device per step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    optim: str = field(default="adamw_torch", metadata={"help": "transformers optimizer name (adamw_torch, sgd, ...)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = no clipping)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    logging_steps: int = field(default=10, metadata={"help": "log loss and throughput every N steps"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only the final model)"})
    save_total_limit: int | None = field(default=None, metadata={"help": "keep at most N checkpoints"})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "a checkpoint folder, or 'latest' for the newest in output_dir"})
    fsdp: str = field(
        default="", metadata={"help": "Trainer FSDP mode, e.g. 'full_shard auto_wrap' (multi-GPU; untested here)"})
    seed: int = field(default=42, metadata={"help": "random seed (data order, masking, dropout)"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "data loading processes"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training texts"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    packing: bool = field(
        default=False, metadata={"help": "padding-free batches: a batch's texts one after another in one row, each "
                                         "attending only to itself (no compute spent on padding)"})
    group_by_length: bool = field(
        default=False, metadata={"help": "batch texts of similar length together (less padding, faster steps)"})

    def validate(self) -> None:
        """Raise ValueError naming the field for values no run could use.

        First every field is checked against its annotation (:func:`check_field_types`, which
        also turns numeric strings such as YAML's ``2e-1`` into numbers), then the ranges.
        """
        check_field_types(self)
        pos = ("lora_r", "lora_alpha", "max_seq_length", "per_device_batch_size", "gradient_accumulation_steps",
               "max_steps", "logging_steps")
        for name in pos:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        for name in ("save_steps", "warmup_steps", "dataloader_num_workers", "freeze_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"learning_rate: expected a finite float > 0, got {self.learning_rate!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay: expected a float >= 0, got {self.weight_decay!r}")
        if not 0 <= self.max_grad_norm < math.inf:
            raise ValueError(f"max_grad_norm: expected a finite float >= 0 (0 = no clipping), got {self.max_grad_norm!r}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            # transformers reads None *and* any value <= 0 as "keep every checkpoint": refuse the
            # ambiguous spellings rather than keep all checkpoints after "keep at most -1"
            raise ValueError(f"save_total_limit: expected None (keep every checkpoint) or an int >= 1, "
                             f"got {self.save_total_limit!r}")
        _check_choice("optim", self.optim, _optimizer_names())
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, _scheduler_names())
        if not (0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout: expected a float in [0, 1), got {self.lora_dropout!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {self.dtype!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend: expected auto, torch or triton, got {self.backend!r}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples: expected None or an int >= 1, got {self.max_train_samples!r}")
        if not self.output_dir:
            raise ValueError("output_dir: expected a folder path, got an empty string")
        if not 0 <= self.seed < 2**32:
            # numpy (transformers' set_seed) takes no other seed; the per-row mask seeds derived
            # from it (seed * 1_000_003 +- row) then stay well inside torch's 64-bit range
            raise ValueError(f"seed: expected an int in [0, 2**32), got {self.seed!r}")


@dataclass
class MNTPConfig(BaseConfig):
    """Masked next-token prediction (LLM2Vec step 2)."""

    train_file: str | None = field(
        default=None, metadata={"help": "training texts: .txt (one per line) or .jsonl ({\"text\": ...})"})
    validation_file: str | None = field(default=None, metadata={"help": "held-out texts (same formats)"})
    validation_split_percentage: float = field(
        default=0.0, metadata={"help": "hold out this percentage of train_file when no validation_file"})
    mlm_probability: float = field(default=0.2, metadata={"help": "fraction of tokens selected for prediction"})
    mask_strategy: str = field(
        default="80-10-10", metadata={"help": "80-10-10 (mask / random / keep) or all (every selected token masked)"})
    mask_token: str = field(
        default="_", metadata={"help": "'_' (the recipe's blank), 'eos', or 'mask' (add <mask>, resize embeddings; "
                                        "its new row stays at its initial value unless embeddings train: "
                                        "--no-use-lora --no-freeze-embeddings)"})
    group_texts: bool = field(
        default=False, metadata={"help": "concatenate texts into max_seq_length blocks instead of one text per row"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate masked-token accuracy every N steps (0 = at the end)"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate"})

    def validate(self) -> None:
        super().validate()
        if not (0.0 < self.mlm_probability < 1.0):
            raise ValueError(f"mlm_probability: expected a float in (0, 1), got {self.mlm_probability!r}")
        if self.mask_strategy not in ("80-10-10", "all"):
            raise ValueError(f"mask_strategy: expected '80-10-10' or 'all', got {self.mask_strategy!r}")
        if self.mask_token not in ("_", "eos", "mask"):
            raise ValueError(f"mask_token: expected '_', 'eos' or 'mask', got {self.mask_token!r}")
        if not (0.0 <= self.validation_split_percentage < 100.0):
            raise ValueError(
                f"validation_split_percentage: expected a float in [0, 100), got {self.validation_split_percentage!r}")
        if self.eval_steps < 0:
            raise ValueError(f"eval_steps: expected an int >= 0, got {self.eval_steps!r}")


@dataclass
class ContrastiveConfig(BaseConfig):
    """Fields shared by SimCSE and supervised contrastive training."""

    pooling_mode: str = field(default="mean", metadata={"help": "mean | weighted_mean | eos_token | last_token | bos_token"})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature (0.05 = scale 20)"})
    symmetric: bool = field(default=False, metadata={"help": "add the document->query direction to the loss"})
    cross_rank: bool = field(default=True, metadata={"help": "negatives from every rank (all-gather with gradients)"})
    mini_batch_size: int | None = field(
        default=None, metadata={"help": "GradCache chunk size: batch size independent of memory (None = off)"})
    attention_dropout: float | None = field(
        default=None, metadata={"help": "attention dropout during training (None = the model's)"})
    packing: bool | None = field(
        default=None, metadata={"help": "padding-free batches: a batch's texts one after another in one row, each "
                                         "attending only to itself and pooled from its own tokens (None = on when "
                                         "the model's attention is patched, as the training pipeline does)"})

    def validate(self) -> None:
        super().validate()
        from ..kernels.reference import POOLING_MODES

        if self.pooling_mode not in POOLING_MODES:
            raise ValueError(f"pooling_mode: expected one of {list(POOLING_MODES)}, got {self.pooling_mode!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature: expected a finite float > 0, got {self.temperature!r}")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise ValueError(f"mini_batch_size: expected None or an int >= 1, got {self.mini_batch_size!r}")
        if self.attention_dropout is not None and not (0.0 <= self.attention_dropout < 1.0):
            raise ValueError(f"attention_dropout: expected None or a float in [0, 1), got {self.attention_dropout!r}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        global_batch = self.per_device_batch_size * (world if self.cross_rank else 1)
        if global_batch < 2:
            raise ValueError(
                f"per_device_batch_size: a contrastive loss needs at least 2 texts per batch (in-batch negatives), "
                f"got {self.per_device_batch_size}" + (f" on {world} rank(s)" if world > 1 else "")
            )


@dataclass
class SimCSEConfig(ContrastiveConfig):
    """Unsupervised SimCSE (LLM2Vec step 3): two dropout views of the same texts."""

    train_file: str | None = field(
        default=None, metadata={"help": "training texts: .txt (one per line) or .jsonl ({\"text\": ...})"})
    learning_rate: float = field(default=3e-5, metadata={"help": "peak learning rate"})
    attention_dropout: float | None = field(
        default=0.3, metadata={"help": "attention dropout that makes the two views differ"})


@dataclass
class SupervisedConfig(ContrastiveConfig):
    """Supervised contrastive training on {query, positive, negative} JSONL files."""

    train_files: list[str] = field(
        default_factory=list, metadata={"help": "JSONL files (or folders of them), one dataset per file"})
    instructions: str | None = field(
        default=None, metadata={"help": "JSON/YAML {dataset name (file stem): instruction} for queries"})
    temperature: float = field(default=0.02, metadata={"help": "InfoNCE temperature (0.02 = scale 50)"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    hard_negatives: bool = field(default=True, metadata={"help": "score each query against the hard negatives too"})


STAGES = {"mntp": MNTPConfig, "simcse": SimCSEConfig, "supervised": SupervisedConfig}


# ----------------------------------------------------------------------------- field types
#
# Values reach a config from Python, JSON, YAML and flags. YAML 1.1 (PyYAML) reads ``2e-1`` as the
# *string* "2e-1" (a float needs a dot), and a quoted ``"false"`` is a truthy string; so every
# field is checked against its annotation, whatever the field, before the range checks run:
#   bool   a real bool only: the CLI never parses bool strings (--flag / --no-flag), so neither
#          does a config file; "false", "yes", 0 and 1 are refused
#   int    an int (not a bool, not a float, even 3.0), or a string of digits ("5" -> 5; not "1e3")
#   float  an int or float, or a string float() reads ("2e-1" -> 0.2); nan and inf are refused
#   str    a string (an os.PathLike becomes its path string); fsdp also takes a list of words
#          ([full_shard, auto_wrap] -> "full_shard auto_wrap", as TrainingArguments reads it)
#   list[X] a list or tuple of X; one scalar X is a one-element list (train_files: a.jsonl)
#   X | None  None, or an X as above


# String fields a list of words may spell (one string, the words joined by spaces).
SPACE_JOINED_FIELDS = ("fsdp",)


class _WrongType(Exception):
    """A value that does not fit an annotation (turned into a ValueError naming the field)."""


_NONE = type(None)
_DESCRIPTIONS = {bool: ("a bool (true or false)", "bools"), int: ("an int", "ints"),
                 float: ("a finite float", "finite floats"), str: ("a string", "strings")}


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


@functools.lru_cache(maxsize=None)
def _field_types(cls) -> dict[str, Any]:
    """{field name: annotation as a type} (``from __future__ import annotations`` leaves strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _describe(tp) -> str:
    if _is_union(tp):
        args = typing.get_args(tp)
        text = " or ".join(_describe(a) for a in args if a is not _NONE)
        return text + " or None" if _NONE in args else text
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp) or (Any,)
        return f"a list of {_DESCRIPTIONS[elem][1]}" if elem in _DESCRIPTIONS else "a list"
    return _DESCRIPTIONS[tp][0] if tp in _DESCRIPTIONS else getattr(tp, "__name__", str(tp))


def _coerce(tp, v):
    """``v`` as annotation ``tp`` wants it; raises _WrongType when it cannot be."""
    if _is_union(tp):
        args = typing.get_args(tp)
        if v is None and _NONE in args:
            return None
        for a in args:
            if a is not _NONE:
                try:
                    return _coerce(a, v)
                except _WrongType:
                    pass
        raise _WrongType
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp) or (Any,)
        if isinstance(v, (str, os.PathLike)):
            return [_coerce(elem, v)]
        if isinstance(v, (list, tuple)):
            return [_coerce(elem, x) for x in v]
        raise _WrongType
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise _WrongType
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, str) and re.fullmatch(r"[+-]?[0-9]+", v.strip()):
            return int(v)
        raise _WrongType
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                x = float(v)
            except OverflowError:
                raise _WrongType from None
        elif isinstance(v, str):
            try:
                x = float(v)
            except ValueError:
                raise _WrongType from None
        else:
            raise _WrongType
        if not math.isfinite(x):
            raise _WrongType
        return x
    if tp is str:
        if isinstance(v, str):
            return v
        if isinstance(v, os.PathLike) and isinstance(os.fspath(v), str):
            return os.fspath(v)
        raise _WrongType
    return v  # an annotation without a rule here: left as given


def check_field_types(cfg) -> None:
    """Check (and convert in place) every field of ``cfg`` against its annotation.

    Numeric strings become numbers (``"2e-1"`` -> 0.2 for a float field, ``"5"`` -> 5 for an
    int field) and a single string becomes a one-element list for a list field; anything else
    that does not fit raises ``ValueError("<field>: expected <type>, got <value>")``.
    """
    for name, tp in _field_types(type(cfg)).items():
        v = getattr(cfg, name)
        if name in SPACE_JOINED_FIELDS and isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
            v = " ".join(v)  # fsdp: [full_shard, auto_wrap] is TrainingArguments' "full_shard auto_wrap"
        try:
            setattr(cfg, name, _coerce(tp, v))
        except _WrongType:
            hint = ""
            if isinstance(v, str) and (tp is bool or bool in typing.get_args(tp)):
                flag = name.replace("_", "-")
                hint = f" (unquoted true/false in a config file; --{flag} / --no-{flag} on the command line)"
            raise ValueError(f"{name}: expected {_describe(tp)}, got {v!r}{hint}") from None


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


@functools.lru_cache(maxsize=None)
def _optimizer_names() -> tuple[str, ...]:
    """The ``optim`` names ``TrainingArguments`` accepts (transformers' OptimizerNames)."""
    from transformers.training_args import OptimizerNames

    return tuple(o.value for o in OptimizerNames)


@functools.lru_cache(maxsize=None)
def _scheduler_names() -> tuple[str, ...]:
    """The ``lr_scheduler_type`` names ``TrainingArguments`` accepts (transformers' SchedulerType)."""
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


# ----------------------------------------------------------------------------- loading


def read_config_file(path: str, *, field_names: bool = True) -> dict:
    """A JSON or YAML mapping of field names (``-`` or ``_`` spellings) to values; with
    ``field_names=False`` the keys are kept as written (dataset names, say)."""
    if not os.path.isfile(path):
        raise ValueError(f"config: file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config: cannot read {path!r}: {e}") from e
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ValueError(f"config: cannot parse {path!r}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path!r} must hold a mapping of settings, got {type(data).__name__}")
    # str(): YAML reads a key such as 2024 as an int
    out = {(str(k).replace("-", "_") if field_names else str(k)): v for k, v in data.items()}
    if field_names and any(k in PATH_FIELDS for k in out):
        _paths_as_written(out, text, path)
    return out


# Fields that name files or folders: a name YAML or JSON reads as a number (``output_dir: 2024``)
# or a date (``2024-01-01``) is taken as written in the file.
PATH_FIELDS = ("model_name_or_path", "peft_model_name_or_path", "output_dir", "resume_from_checkpoint",
               "train_file", "validation_file", "train_files", "instructions")


def _paths_as_written(values: dict, text: str, path: str) -> None:
    """Replace, in ``values``, a path field's number or date (or a list's) by its text in the file."""
    import datetime

    def written(v):
        return isinstance(v, (int, float, datetime.date)) and not isinstance(v, bool)

    todo = [k for k in PATH_FIELDS if k in values and (written(values[k]) or (
        isinstance(values[k], list) and any(written(x) for x in values[k])))]
    if not todo:
        return
    if path.endswith((".yaml", ".yml")):
        import yaml

        raw = yaml.load(text, Loader=yaml.BaseLoader)  # every scalar as the string written
    else:
        raw = json.loads(text, parse_int=str, parse_float=str)
    raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
    for k in todo:
        v, r = values[k], raw.get(k)
        if isinstance(v, list) and isinstance(r, list) and len(r) == len(v):
            values[k] = [ri if written(vi) and isinstance(ri, str) else vi for vi, ri in zip(v, r)]
        elif written(v) and isinstance(r, str):
            values[k] = r


def make_config(cls, values: dict | None = None, **overrides) -> BaseConfig:
    """Build ``cls`` from ``values`` then ``overrides``; unknown keys raise ValueError."""
    names = {f.name for f in dataclasses.fields(cls)}
    merged = dict(values or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(merged) - names, key=str)
    if unknown:
        raise ValueError(f"config: unknown setting(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    cfg = cls(**merged)
    cfg.validate()
    return cfg


def _base_type(tp):
    """(python type, is_list) for a dataclass field annotation given as a string."""
    s = str(tp)
    is_list = s.startswith("list")
    for name, t in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if s.startswith(f"list[{name}") or s.startswith(name):
            return t, is_list
    return str, is_list


def add_config_arguments(parser, cls) -> None:
    """One ``--flag`` per field of ``cls`` (default None: only given flags override)."""
    parser.add_argument("--config", default=None, help="JSON or YAML file of settings (flags override it)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp, is_list = _base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        if tp is bool:  # --flag / --no-flag, both listed by --help
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_)
        elif is_list:
            parser.add_argument(flag, dest=f.name, default=None, nargs="+", type=tp, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, default=None, type=tp, help=help_)


def config_from_args(cls, args) -> BaseConfig:
    """The config for parsed ``args``: the --config file, then the flags that were given."""
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    return make_config(cls, values, **flags)


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


__all__ = [
    "ConfigError", "BaseConfig", "MNTPConfig", "ContrastiveConfig", "SimCSEConfig", "SupervisedConfig", "STAGES",
    "read_config_file", "make_config", "add_config_arguments", "config_from_args", "config_to_dict",
]

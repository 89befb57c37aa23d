"""An MTEB encoder around :class:`llm2vec_fast.LLM2Vec` (``pip install 'llm2vec-fast[mteb]'``).

Implements the ``mteb`` package's encoder protocol (mteb >= 2: ``encode(inputs: DataLoader,
*, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> array``, plus
``similarity``, ``similarity_pairwise`` and ``mteb_model_meta``), the way mteb's own
``LLM2VecModel`` wraps the original package: every text is paired with the task's
instruction (the LLM2Vec paper's format, ending in ``":"``), which is attended to but
excluded from pooling.

Usage::

    import mteb
    from llm2vec_fast.mteb_wrapper import LLM2VecMTEB

    model = LLM2VecMTEB("smollm2-135m")              # or LLM2VecMTEB(encoder=my_llm2vec)
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]))

Importing this module imports mteb; ``import llm2vec_fast`` never does.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction

from .encoder import LLM2Vec

# Keywords of LLM2Vec.encode that mteb's encode_kwargs may carry; others are dropped.
_ENCODE_KEYS = ("batch_size", "show_progress_bar", "device", "normalize_embeddings")


def llm2vec_instruction(instruction: str) -> str:
    """LLM2Vec's instruction format: one trailing colon (``"Retrieve text."`` -> ``"Retrieve text:"``)."""
    instruction = instruction.strip()
    if instruction and not instruction.endswith(":"):
        instruction = instruction.rstrip(".") + ":"
    return instruction


class LLM2VecMTEB(AbsEncoder):
    """MTEB encoder protocol for an LLM2Vec encoder.

    Args:
        model_name: what :meth:`LLM2Vec.from_pretrained` loads (ignored when ``encoder`` is
            given); ``"smollm2-135m"`` is the offline default model.
        revision: recorded in the model metadata.
        device: where to run (default: CUDA if available).
        encoder: an :class:`LLM2Vec` already in memory (e.g. straight from training).
        model_prompts: ``{key: instruction}`` overriding the task's own instruction. A key is
            a task name (``"STSBenchmark"``), a task type (``"STS"``), a prompt type
            (``"query"``, ``"document"``) or ``"{task name or type}-{prompt type}"``; for a
            task the first key present in this order is used (mteb's own order):
            ``"{task_name}-{prompt_type}"``, ``task_name``, ``"{task_type}-{prompt_type}"``,
            ``task_type``, ``prompt_type``. With none of them present, the task's own
            instruction is used (mteb's ``get_instruction``). An empty instruction means plain
            texts for those tasks.
        use_instructions: pair texts with the task instruction (False: plain texts).
        batch_size: default texts per forward pass (mteb's ``encode_kwargs`` override it).
        kwargs: passed to :meth:`LLM2Vec.from_pretrained` (``peft_model_name_or_path``,
            ``dtype``, ``pooling_mode``, ...).
    """

    def __init__(
        self,
        model_name: str | None = None,
        revision: str | None = None,
        *,
        device: str | None = None,
        encoder: LLM2Vec | None = None,
        model_prompts: dict[str, str] | None = None,
        use_instructions: bool = True,
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        if encoder is None:
            if model_name is None:
                raise ValueError("model_name: expected a model name or path when no encoder is given, got None")
            encoder = LLM2Vec.from_pretrained(model_name, **kwargs)
        elif not isinstance(encoder, LLM2Vec):
            raise ValueError(f"encoder: expected an llm2vec_fast.LLM2Vec, got {type(encoder).__name__}")
        if device is not None:
            encoder.model.to(device)
        elif torch.cuda.is_available() and encoder._model_device().type == "cpu":
            encoder.model.to("cuda")
        self.model = encoder
        self.model_prompts = self.validate_task_to_prompt_name(model_prompts) if model_prompts else None
        self.prompts_dict = self.model_prompts
        self.use_instructions = use_instructions
        self.batch_size = batch_size
        name = model_name or getattr(encoder.config, "_name_or_path", None) or "model"
        self._meta = ModelMeta(
            loader=None,
            name=f"llm2vec-fast/{os.path.basename(str(name).rstrip('/')) or 'model'}",
            revision=revision,
            release_date=None,
            languages=None,
            n_parameters=sum(p.numel() for p in encoder.model.parameters()),
            memory_usage_mb=None,
            max_tokens=encoder.max_length,
            embed_dim=int(encoder.model.config.hidden_size),
            license=None,
            open_weights=True,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            similarity_fn_name=ScoringFunction.COSINE,
            use_instructions=use_instructions,
            training_datasets=None,
        )

    @property
    def mteb_model_meta(self) -> ModelMeta:
        return self._meta

    def prompt_key(self, task_metadata, prompt_type=None) -> str | None:
        """The key of ``model_prompts`` that applies to a task and prompt type, the first present
        of ``"{task_name}-{prompt_type}"``, ``task_name``, ``"{task_type}-{prompt_type}"``,
        ``task_type``, ``prompt_type``; None when there is none (or no ``model_prompts``)."""
        if not self.model_prompts:
            return None
        name = getattr(task_metadata, "name", None)
        task_type = getattr(task_metadata, "type", None)
        kind = getattr(prompt_type, "value", prompt_type)  # a PromptType, its value, or None
        candidates = (f"{name}-{kind}" if name and kind else None, name,
                      f"{task_type}-{kind}" if task_type and kind else None, task_type, kind)
        return next((k for k in candidates if k and k in self.model_prompts), None)

    def task_instruction(self, task_metadata, prompt_type=None) -> str:
        """The instruction for a task (before :func:`llm2vec_instruction`): ``model_prompts``
        by :meth:`prompt_key`'s order, else the task's own (mteb's ``get_instruction``)."""
        key = self.prompt_key(task_metadata, prompt_type)
        if key is not None:
            return self.model_prompts[key] or ""
        return self.get_instruction(task_metadata, prompt_type) or ""

    def encode(
        self,
        inputs,
        *,
        task_metadata,
        hf_split: str,
        hf_subset: str,
        prompt_type=None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed every text of ``inputs`` (a DataLoader of ``{"text": [...]}`` batches).

        Returns ``(N, C)`` float32 numpy, in the loader's order.
        """
        instruction = ""
        if self.use_instructions:
            instruction = llm2vec_instruction(self.task_instruction(task_metadata, prompt_type) or "")
        texts = [t for batch in inputs for t in batch["text"]]
        sentences = [[instruction, t] for t in texts] if instruction else texts
        enc_kw = {k: kwargs[k] for k in _ENCODE_KEYS if k in kwargs}
        enc_kw.setdefault("batch_size", self.batch_size)
        enc_kw.setdefault("show_progress_bar", False)
        return self.model.encode(sentences, convert_to_numpy=True, **enc_kw)

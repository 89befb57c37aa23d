"""The LLM2Vec encoder: a drop-in, faster replacement for ``llm2vec.LLM2Vec`` (0.2.3).

Shapes: ``B`` texts in a batch, ``T`` tokens (padded length), ``C`` hidden size,
``total`` tokens of a packed (padding-free) batch.

What differs from the original, and why:

- **Instruction masking by token offsets, one batched tokenisation.** The original joins
  instruction and text with a magic separator string and re-tokenises every text alone to
  count its tokens (slow, and wrong when the text's first token merges differently with or
  without the leading space). Here ``instruction.strip() + " " + text`` is tokenised once
  for the whole input with ``return_offsets_mapping``; a token belongs to the text when its
  character span starts at or after the end of the instruction, i.e. the token that carries
  the separating space and the text's first word counts as text (GPT-2 / Llama-3 style BPE
  and SentencePiece both attach the space to the following word). A token that straddles
  the boundary (starts inside the instruction, ends in the text; no common tokenizer makes
  one across a space) is counted as instruction. Special tokens the tokenizer adds (BOS)
  are never pooled, as in the original (its embed mask covers the text tokens only).
  Tokenizers without offsets (slow, Python ones) fall back to counting the instruction's
  tokens from one batched call of the instructions alone.
- **Sorted batches, order restored.** Texts are sorted by token count (longest first, so an
  out-of-memory error shows up on the first batch), batched, and the embeddings scattered
  back to input order.
- **Vectorised pooling** through :func:`llm2vec_fast.ops.info_nce.pool` (fp32 sums), for
  either padding side, with explicit ``position_ids`` derived from the attention mask, so
  a left-padded causal model sees the same positions as an unpadded one.
- **Packed forward** (``packed=True``, default on CUDA when the model is patched by
  :func:`llm2vec_fast.patch_model`): the batch is one ``(1, total)`` row with position ids
  restarting at 0 per text and no padding at all.
- **Multi-device encode** (``devices=[...]``): one worker process per device, each loading
  its own copy of the model from disk (never a pickled model); see :meth:`LLM2Vec.encode`.
- ``torch.inference_mode`` for encoding; ``dtype=torch.bfloat16`` in ``from_pretrained``
  is the documented fast option on CPUs with AVX512-BF16 / AMX and on GPUs.

Differences in behaviour worth knowing: ``doc_max_length`` truncates the text to that many
*tokens* (the original cut words by a ratio until the token count fitted, so it could cut
a few tokens more); a text with no pooled token (an empty text) pools to the zero vector
(the original gave NaN for mean pooling); ``eos_token`` pooling appends the tokenizer's EOS
token id (the original appended the string ``" </s>"`` for every Llama/Mistral config,
which is not an EOS token for Llama-3 or SmolLM2 vocabularies); ``bos_token`` pooling
takes the BOS token's state, as the original, and the text's first token when the tokenizer
adds no BOS (the original found no token there).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Sequence

import numpy as np
import torch

from .ops._dispatch import warn_once
from .ops.info_nce import POOLING_MODES, pool

CONFIG_NAME = "llm2vec_fast_config.json"
ORIGINAL_CONFIG_NAME = "llm2vec_config.json"  # written by llm2vec 0.2.3; read for compatibility
ENCODER_KEYS = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")
# What an adapter folder given as ``peft_model_name_or_path`` contributes to the encoder: its
# settings, never the keys that say where the weights come from (``adapter_only``,
# ``base_model_name_or_path``, ``merged_adapters``: the base is the model named).
PEFT_FOLDER_KEYS = ENCODER_KEYS + ("padding_side", "enable_bidirectional")
# from_pretrained arguments that say which weights a name loads (besides the name): an
# adapter-only save records them as ``base_model_kwargs``, so the base loads back.
BASE_LOAD_KEYS = ("gguf_file", "revision", "subfolder")


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def normalize_inputs(sentences) -> tuple[list[tuple[str, str]], bool]:
    """Validate ``sentences`` and return ``([(instruction, text), ...], single)``.

    Accepts a list/tuple of strings, of ``[instruction, text]`` pairs, or a mix; a bare
    string is one text (``single=True``: the caller returns one vector). Raises
    ``ValueError`` naming the offending element for anything else.
    """
    if isinstance(sentences, str):
        return [("", sentences)], True
    if isinstance(sentences, np.ndarray):
        sentences = sentences.tolist()
    if not isinstance(sentences, (list, tuple)):
        raise ValueError(
            f"sentences: expected a list of strings or of [instruction, text] pairs, got {type(sentences).__name__}"
        )
    if len(sentences) == 0:
        raise ValueError("sentences: expected at least one text, got an empty list")
    out = []
    for i, s in enumerate(sentences):
        if isinstance(s, str):
            out.append(("", s))
        elif isinstance(s, (list, tuple)):
            if len(s) != 2:
                raise ValueError(
                    f"sentences[{i}]: expected an [instruction, text] pair (2 strings), got {len(s)} elements"
                )
            if not all(isinstance(x, str) for x in s):
                raise ValueError(
                    f"sentences[{i}]: expected an [instruction, text] pair of strings, got "
                    f"[{type(s[0]).__name__}, {type(s[1]).__name__}]"
                )
            out.append((s[0], s[1]))
        else:
            raise ValueError(
                f"sentences[{i}]: expected a string or an [instruction, text] pair, got {type(s).__name__}"
            )
    return out, False


def _check_encoder_args(pooling_mode, max_length, doc_max_length, skip_instruction):
    if pooling_mode not in POOLING_MODES:
        raise ValueError(f"pooling_mode: expected one of {list(POOLING_MODES)}, got {pooling_mode!r}")
    if not (isinstance(max_length, int) and max_length >= 1):
        raise ValueError(f"max_length: expected an int >= 1, got {max_length!r}")
    if not (isinstance(doc_max_length, int) and doc_max_length >= 1):
        raise ValueError(f"doc_max_length: expected an int >= 1, got {doc_max_length!r}")
    if not isinstance(skip_instruction, bool):
        raise ValueError(f"skip_instruction: expected a bool, got {skip_instruction!r}")


# --------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------


class LLM2Vec(torch.nn.Module):
    """Text encoder around a (bidirectional) decoder-only transformer.

    Args:
        model: a transformers base model (``AutoModel``: returns ``last_hidden_state``
            ``(B, T, C)``), optionally patched by :func:`llm2vec_fast.patch_model` or
            wrapped by peft.
        tokenizer: its tokenizer (a pad token is set to EOS when missing).
        pooling_mode: one of ``mean``, ``weighted_mean``, ``last_token``, ``eos_token``,
            ``bos_token`` (the BOS token's state; the text's first token without a BOS).
        max_length: tokens per input (instruction + text + special tokens) after truncation.
        doc_max_length: tokens of the text part (instructions not counted).
        skip_instruction: exclude instruction tokens (and special tokens) from the pooled
            vector; they are still attended to.
        padding_side: ``"left"``, ``"right"`` or None (the tokenizer's).
        packed: use the padding-free forward; None = on CUDA when the model is patched.
    """

    def __init__(
        self,
        model,
        tokenizer,
        pooling_mode: str = "mean",
        max_length: int = 512,
        doc_max_length: int = 400,
        skip_instruction: bool = True,
        *,
        padding_side: str | None = None,
        packed: bool | None = None,
    ):
        super().__init__()
        _check_encoder_args(pooling_mode, max_length, doc_max_length, skip_instruction)
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side: expected 'left', 'right' or None, got {padding_side!r}")
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pooling_mode = pooling_mode
        self.max_length = max_length
        self.doc_max_length = doc_max_length
        self.skip_instruction = skip_instruction
        self.padding_side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
        self.packed = packed
        self.config = getattr(model, "config", None)
        # How to rebuild this encoder in another process (set by from_pretrained), valid while
        # the weights still are what it loaded (_weights_fingerprint then).
        self._load_spec: dict | None = None
        self._load_fingerprint = None
        # (base model, adapters merged into it at load, the base's BASE_LOAD_KEYS arguments)
        # behind the model's weights, for save().
        self._weights_recipe: tuple | None = None
        # None: character offsets when the tokenizer is a fast one (tests force False to
        # exercise the instruction-count fallback).
        self._use_offsets: bool | None = None

    # ---------------------------------------------------------------- loading / saving

    @classmethod
    def from_pretrained(
        cls,
        base_model_name_or_path: str,
        peft_model_name_or_path: str | None = None,
        merge_peft: bool = False,
        enable_bidirectional: bool | None = None,
        **kwargs,
    ) -> "LLM2Vec":
        """Load a model and tokenizer, make the model bidirectional, wrap it.

        Args:
            base_model_name_or_path: a local folder or hub name; ``"smollm2-135m"`` names
                the offline default model (SmolLM2-135M-Instruct from its GGUF file). A
                folder written by :meth:`save` restores the encoder settings it recorded.
            peft_model_name_or_path: a LoRA adapter to load on top (merged if
                ``merge_peft``).
            enable_bidirectional: patch attention to be bidirectional
                (:func:`llm2vec_fast.patch_model`); False keeps the causal model; None =
                what a folder written by :meth:`save` recorded, else True.
            kwargs: encoder settings (``pooling_mode``, ``max_length``, ``doc_max_length``,
                ``skip_instruction``, ``padding_side``, ``packed``, ``backend`` for
                patch_model) override the saved ones; everything else goes to transformers'
                ``from_pretrained`` (``dtype``, ``gguf_file``, ``device_map``, ...).
                ``dtype=torch.bfloat16`` is the fast option (about 2x on CPUs with
                AVX512-BF16, at a small accuracy cost).
        """
        from transformers import AutoModel, AutoTokenizer

        from .models import resize_for_adapter, resolve_model_name

        spec = dict(
            base_model_name_or_path=base_model_name_or_path, peft_model_name_or_path=peft_model_name_or_path,
            merge_peft=merge_peft, enable_bidirectional=enable_bidirectional, **kwargs,
        )
        enc_args = {k: kwargs.pop(k) for k in ENCODER_KEYS if kwargs.get(k) is not None}
        padding_side = kwargs.pop("padding_side", None)
        packed = kwargs.pop("packed", None)
        backend = kwargs.pop("backend", "auto")
        if "torch_dtype" in kwargs and "dtype" not in kwargs:  # older spelling
            kwargs["dtype"] = kwargs.pop("torch_dtype")

        path, extra = resolve_model_name(base_model_name_or_path)
        for k, v in extra.items():
            kwargs.setdefault(k, v)
        saved = _read_saved_config(path)
        if peft_model_name_or_path is not None:
            # An adapter folder written by save() or by MNTP training also records where *its*
            # weights came from (adapter_only, base_model_name_or_path, merged_adapters); here
            # the base is the model named, so only its encoder settings apply.
            peft_saved = _read_saved_config(peft_model_name_or_path)
            if peft_saved.get("merged_adapters"):
                warnings.warn(
                    f"peft_model_name_or_path: {peft_model_name_or_path} was trained over "
                    f"{peft_saved.get('base_model_name_or_path')} with adapters merged into it "
                    f"({peft_saved['merged_adapters']}); only the adapter itself is applied to "
                    f"{base_model_name_or_path}. Load {peft_model_name_or_path} as the model to rebuild those weights.",
                    RuntimeWarning, stacklevel=2)
            saved.update({k: v for k, v in peft_saved.items() if k in PEFT_FOLDER_KEYS})
        # The tokenizer comes from the folder named (a GGUF one needs its gguf_file).
        tok_kwargs = {k: kwargs[k] for k in ("gguf_file", "revision", "trust_remote_code") if k in kwargs}
        tokenizer = AutoTokenizer.from_pretrained(path, **tok_kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        if enable_bidirectional is None:
            enable_bidirectional = bool(saved.get("enable_bidirectional", True))
        # What the model's (non-adapter) weights are: a base and the adapters merged into it,
        # in order; save() of an unmerged adapter records this so the folder loads back.
        weights_base, merged = base_model_name_or_path, []
        base_for_weights = path
        base_kwargs = {k: kwargs[k] for k in BASE_LOAD_KEYS if kwargs.get(k) is not None}
        adapter_in_base = bool(saved.get("adapter_only", False))
        if adapter_in_base:  # save() of an unmerged peft model: the base weights live elsewhere
            weights_base = saved.get("base_model_name_or_path")
            if not weights_base:
                raise ValueError(f"base_model_name_or_path: {path} holds only an adapter and names no base model")
            merged = list(saved.get("merged_adapters", [])) + [_abs_if_dir(path)]
            base_for_weights, extra2 = resolve_model_name(weights_base)
            # the base's own loading arguments (a GGUF file name) replace those of the folder named
            base_kwargs = {k: v for k, v in saved.get("base_model_kwargs", {}).items() if k in BASE_LOAD_KEYS}
            for k in BASE_LOAD_KEYS:
                kwargs.pop(k, None)
            kwargs.update({**base_kwargs, **extra2})

        model = AutoModel.from_pretrained(base_for_weights, **kwargs)
        if merged:
            from peft import PeftModel

            for adapter in merged:
                resize_for_adapter(model, adapter)  # an adapter saved with added tokens' rows
                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        if peft_model_name_or_path is not None:
            from peft import PeftModel

            resize_for_adapter(model, peft_model_name_or_path)
            model = PeftModel.from_pretrained(model, peft_model_name_or_path)
            if merge_peft:
                model = model.merge_and_unload()
                merged.append(_abs_if_dir(peft_model_name_or_path))
        if enable_bidirectional:
            from .hf.patch import patch_model

            patch_model(model, backend=backend)
        model.eval()

        config = {k: saved[k] for k in ENCODER_KEYS if k in saved}
        config.update(enc_args)
        if padding_side is None:
            padding_side = saved.get("padding_side")
        enc = cls(model, tokenizer, **config, padding_side=padding_side, packed=packed)
        enc._load_spec = spec
        enc._load_fingerprint = enc._weights_fingerprint()
        enc._weights_recipe = (_abs_if_dir(weights_base), merged, base_kwargs)
        return enc

    def save(self, output_path: str, merge_before_save: bool = False, save_config: bool = True) -> None:
        """Write the model (safetensors), the tokenizer and ``llm2vec_fast_config.json``.

        A peft model is merged first when ``merge_before_save``; otherwise only its adapter
        is written and the config records the base model and the adapters merged into it
        at load time, so :meth:`from_pretrained` on ``output_path`` rebuilds the weights and
        applies the adapter. A peft model whose base is unknown (built in memory, no
        ``base_model_name_or_path``) is written merged from a copy, with a warning.
        """
        model = self.model
        is_peft = hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")
        base, merged, base_kwargs = self._weights_recipe or (None, [], {})
        if is_peft and not merge_before_save and not base:
            base = getattr(model.peft_config.get("default"), "base_model_name_or_path", None)
            if not base:
                import copy

                warn_once("encoder-save-unknown-base", "LLM2Vec.save: the peft model's base model is unknown "
                          "(no base_model_name_or_path), so the weights are written merged (from a copy)")
                model = copy.deepcopy(model).merge_and_unload()
                is_peft = False
        os.makedirs(output_path, exist_ok=True)
        if is_peft and merge_before_save:
            model = model.merge_and_unload()
            self.model = model
            is_peft = False
        _save_pretrained_dequantized(model, output_path)
        self.tokenizer.save_pretrained(output_path)
        if save_config:
            cfg = {k: getattr(self, k) for k in ENCODER_KEYS}
            cfg["padding_side"] = self.padding_side
            cfg["enable_bidirectional"] = self._is_patched()  # what the saved model is, however it was built
            if is_peft:
                cfg["adapter_only"] = True
                cfg["base_model_name_or_path"] = base
                if base_kwargs:
                    cfg["base_model_kwargs"] = dict(base_kwargs)
                if merged:
                    cfg["merged_adapters"] = list(merged)
            with open(os.path.join(output_path, CONFIG_NAME), "w") as f:
                json.dump(cfg, f, indent=2)

    # ---------------------------------------------------------------- tokenisation

    def _tokenize_items(self, pairs: list[tuple[str, str]]):
        """Token ids and the pooled span of every input, from one batched tokenisation.

        Returns ``(ids, start, end)``: ``ids`` a list of int lists (truncated), and the
        pooled region ``[start, end)`` of each (the text tokens, plus the appended EOS for
        ``eos_token`` pooling; the whole input when ``skip_instruction`` is False).
        """
        tok = self.tokenizer
        full, instr_chars = [], []
        for instr, text in pairs:
            instr = instr.strip()
            if instr and text:  # no separating space before an empty text: it would be a text token
                full.append(instr + " " + text)
                instr_chars.append(len(instr))
            else:
                full.append(instr or text)
                instr_chars.append(len(instr))
        use_offsets = self._use_offsets if self._use_offsets is not None else bool(getattr(tok, "is_fast", False))
        enc = tok(
            full, add_special_tokens=True, truncation=False, padding=False,
            return_offsets_mapping=use_offsets, return_special_tokens_mask=True, return_attention_mask=False,
        )
        if not use_offsets:
            instr_counts = self._instruction_token_counts(pairs)
        eos_id = tok.eos_token_id
        add_eos = self.pooling_mode == "eos_token" and eos_id is not None
        bos_id = tok.bos_token_id
        pad_id = next((t for t in (tok.pad_token_id, eos_id) if t is not None), 0)
        ids_out, starts, ends = [], [], []
        truncated = doc_truncated = False
        for i, ids in enumerate(enc["input_ids"]):
            special = enc["special_tokens_mask"][i]
            n = len(ids)
            # leading / trailing special tokens (BOS, EOS added by the tokenizer)
            lead = 0
            while lead < n and special[lead]:
                lead += 1
            trail = n
            while trail > lead and special[trail - 1]:
                trail -= 1
            if use_offsets:
                offs = enc["offset_mapping"][i]
                ic = instr_chars[i]
                t0 = lead
                while t0 < trail and offs[t0][0] < ic:
                    t0 += 1
            else:
                t0 = min(lead + instr_counts[i], trail)
            body_pre = ids[:t0]  # specials + instruction
            text_ids = ids[t0:trail]
            suffix = ids[trail:]
            if len(text_ids) > self.doc_max_length:
                text_ids = text_ids[: self.doc_max_length]
                doc_truncated = True
            if add_eos and not (suffix and suffix[-1] == eos_id):
                suffix = suffix + [eos_id]
            room = self.max_length - len(suffix)
            if len(body_pre) + len(text_ids) > room:
                truncated = True
                keep = max(room, 0)
                if len(body_pre) > keep:
                    body_pre = body_pre[:keep]
                    text_ids = []
                else:
                    text_ids = text_ids[: keep - len(body_pre)]
                if room < 0:
                    suffix = suffix[-self.max_length :]
            seq = body_pre + text_ids + suffix
            if self.skip_instruction:
                s = len(body_pre)
                # eos_token: the EOS is the sequence's last token (after any trailing special
                # token the tokenizer adds, a [SEP]), not necessarily right after the text
                e = len(seq) if add_eos else s + len(text_ids)
                if self.pooling_mode == "bos_token" and lead and bos_id is not None and seq and seq[0] == bos_id:
                    s = 0  # the BOS token's state, as the original (the text's first token without a BOS)
            else:
                s, e = 0, len(seq)
            if not seq:
                # No token at all (an empty text, a tokenizer without BOS): one pad token
                # outside the pooled region keeps the batch's shapes valid; the vector is 0.
                seq, s, e = [pad_id], 0, 0
            ids_out.append(seq)
            starts.append(s)
            ends.append(e)
        if doc_truncated:
            warn_once(
                "encoder-doc-truncate",
                f"LLM2Vec.encode: some texts exceed doc_max_length={self.doc_max_length} tokens and were truncated",
            )
        if truncated:
            warn_once(
                "encoder-truncate",
                f"LLM2Vec.encode: some inputs exceed max_length={self.max_length} tokens and were truncated",
            )
        return ids_out, starts, ends

    def _instruction_token_counts(self, pairs) -> list[int]:
        """Tokens of each instruction (without special tokens), one batched call.

        Only for tokenizers without offsets; assumes the tokenizer does not merge across
        the separating space (true of BPE with a whitespace pre-tokenizer and SentencePiece).
        """
        instrs = [p[0].strip() for p in pairs]
        enc = self.tokenizer(instrs, add_special_tokens=False, truncation=False, padding=False)
        return [len(x) if s else 0 for x, s in zip(enc["input_ids"], instrs)]

    def _collate(self, ids, starts, ends, device, packed: bool):
        """Tensors for one batch (vectorised, no per-text Python loop over tokens).

        Padded: input_ids / attention_mask / position_ids / embed_mask ``(B, T)``.
        Packed: input_ids / position_ids ``(1, total)``, embed_mask ``(total,)``,
        cu_seqlens ``(B+1,)`` int32.
        """
        lens = torch.tensor([len(x) for x in ids], dtype=torch.long)
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.long)
        st = torch.tensor(starts, dtype=torch.long)
        en = torch.tensor(ends, dtype=torch.long)
        B = len(ids)
        if packed:
            cu = torch.zeros(B + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(lens, 0)
            seq_of = torch.repeat_interleave(torch.arange(B), lens)
            pos = torch.arange(int(cu[-1])) - cu[:-1].long()[seq_of]
            emb = (pos >= st[seq_of]) & (pos < en[seq_of])
            return dict(
                input_ids=flat[None].to(device), position_ids=pos[None].to(device),
                embed_mask=emb.to(device), cu_seqlens=cu.to(device),
            )
        T = int(lens.max())
        ar = torch.arange(T)[None, :]
        if self.padding_side == "left":
            pad = (T - lens)[:, None]
            mask = ar >= pad
            pos = (ar - pad).clamp_min(0)
        else:
            mask = ar < lens[:, None]
            pos = ar.expand(B, T).clone()
        input_ids = torch.full((B, T), self.tokenizer.pad_token_id, dtype=torch.long)
        input_ids[mask] = flat  # row-major boolean assignment = concatenation order
        pos = torch.where(mask, pos, torch.zeros_like(pos))
        emb = mask & (pos >= st[:, None]) & (pos < en[:, None])
        return dict(
            # a bool mask: what transformers and the patched model use internally (no conversion)
            input_ids=input_ids.to(device), attention_mask=mask.to(device),
            position_ids=pos.to(device), embed_mask=emb.long().to(device),
        )

    def tokenize(self, sentences, device=None) -> dict:
        """Padded features ``input_ids``, ``position_ids``, ``embed_mask`` ``(B, T)`` int64 and
        ``attention_mask`` ``(B, T)`` bool for texts or ``[instruction, text]`` pairs (for
        :meth:`forward`)."""
        pairs, _ = normalize_inputs(sentences)
        ids, st, en = self._tokenize_items(pairs)
        return self._collate(ids, st, en, device or "cpu", packed=False)

    # ---------------------------------------------------------------- forward / pooling

    def _use_packed(self, device) -> bool:
        if self.packed is None:
            return torch.device(device).type == "cuda" and self._is_patched()
        if self.packed and not self._is_patched():
            # Only the patched attention reads the packed batch's sequence boundaries: a
            # stock model would let every text attend to the ones packed before it.
            warn_once("encoder-packed-unpatched", "LLM2Vec: packed=True needs a model patched by patch_model "
                      "(llm2vec_fast); this one is not, so batches are padded instead")
            return False
        return bool(self.packed)

    def _base_model(self):
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def forward(self, features: dict, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Pooled embeddings ``(B, C)`` in the model's dtype, or ``out_dtype`` (with
        autograd, for training; :meth:`encode` asks for the fp32 sums unrounded).

        ``features``: padded (``input_ids``, ``attention_mask``, ``embed_mask`` ``(B, T)``,
        optional ``position_ids``) or packed (``input_ids``/``position_ids`` ``(1, total)``,
        ``embed_mask`` ``(total,)``, ``cu_seqlens`` ``(B+1,)`` int32).
        """
        feats = dict(features)
        embed_mask = feats.pop("embed_mask", None)
        cu = feats.pop("cu_seqlens", None)
        if cu is not None:
            lens = cu[1:] - cu[:-1]
            mx = int(lens.max())
            out = self.model(
                input_ids=feats["input_ids"], position_ids=feats["position_ids"],
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=mx, max_length_k=mx,
            )
            hidden = out.last_hidden_state[0]
            return pool(hidden, None, embed_mask, self.pooling_mode, cu_seqlens=cu, out_dtype=out_dtype)
        if "position_ids" not in feats:
            # positions from the mask: left padding must not shift a text's positions
            m = feats["attention_mask"].long()
            feats["position_ids"] = (m.cumsum(-1) - 1).clamp_min(0)
        out = self.model(**feats)
        hidden = out.last_hidden_state
        if embed_mask is None or not self.skip_instruction:
            embed_mask = None
        return pool(hidden, feats["attention_mask"], embed_mask, self.pooling_mode, out_dtype=out_dtype)

    # ---------------------------------------------------------------- encoding

    def _model_device(self):
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover
            return torch.device("cpu")

    def encode(
        self,
        sentences,
        batch_size: int = 32,
        show_progress_bar: bool = True,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = False,
        device=None,
        normalize_embeddings: bool = False,
        *,
        devices: Sequence | None = None,
    ):
        """Embed texts or ``[instruction, text]`` pairs, returned in input order.

        Args:
            sentences: ``list[str]``, ``list[[instruction, text]]`` (mixed allowed) or one str.
            batch_size: texts per forward pass.
            convert_to_numpy: return an ``np.ndarray`` ``(N, C)`` float32 (unless
                ``convert_to_tensor``); otherwise a CPU ``torch.Tensor`` ``(N, C)`` float32.
            device: where to run; None = where the model is (the model is moved otherwise).
            normalize_embeddings: L2-normalise every vector.
            devices: several devices (``["cuda:0", "cuda:1"]``, or ``["cpu", "cpu"]`` for
                CPU processes): one worker process per entry, each loading its own model
                copy from disk (the folder this encoder was loaded from, or a temporary
                :meth:`save` of it). One entry behaves like ``device``.

        A single string input returns one vector ``(C,)``. Raises ``ValueError`` for an
        empty list, a pair that is not two strings, or a non-string element.
        """
        pairs, single = normalize_inputs(sentences)
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        if devices is not None:
            if isinstance(devices, (str, torch.device)) or not len(devices):
                raise ValueError(f"devices: expected a non-empty list of devices (['cuda:0', 'cuda:1']), got {devices!r}")
            for d in devices:
                try:
                    torch.device(d)
                except (RuntimeError, TypeError):
                    raise ValueError(f"devices: expected device names like 'cpu' or 'cuda:1', got {d!r}") from None
        if devices is not None and len(devices) > 1:
            emb = self._encode_multi(pairs, batch_size, list(devices), show_progress_bar)
        else:
            if devices:
                device = devices[0]
            emb = self._encode_local(pairs, batch_size, device, show_progress_bar)
        if normalize_embeddings:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        if single:
            emb = emb[0]
        if convert_to_numpy and not convert_to_tensor:
            return emb.numpy()
        return emb

    def _encode_local(self, pairs, batch_size, device, show_progress_bar) -> torch.Tensor:
        if device is None:
            device = self._model_device()
        else:
            device = torch.device(device)
            if self._model_device() != device:
                self.model.to(device)
        # eval() for encoding, then every module's own mode back (a training loop that
        # evaluates with encode keeps its dropout; frozen parts it keeps in eval stay so).
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            return self._encode_batches(pairs, batch_size, device, show_progress_bar)
        finally:
            for m, t in modes:
                m.training = t

    def _encode_batches(self, pairs, batch_size, device, show_progress_bar) -> torch.Tensor:
        from tqdm.auto import tqdm

        ids, st, en = self._tokenize_items(pairs)
        # longest first: the biggest batch runs first, so memory errors come early
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        packed = self._use_packed(device)
        out = None
        for b0 in tqdm(range(0, len(order), batch_size), desc="Batches", disable=not show_progress_bar):
            idx = order[b0 : b0 + batch_size]
            # Built outside inference mode on purpose: the patched model caches the padding
            # structure keyed on the mask's version counter, which inference tensors lack.
            feats = self._collate([ids[i] for i in idx], [st[i] for i in idx], [en[i] for i in idx], device, packed)
            with torch.inference_mode():
                e = self.forward(feats, out_dtype=torch.float32).cpu()
            if out is None:
                out = torch.empty(len(ids), e.shape[1], dtype=torch.float32)
            out[torch.tensor(idx)] = e
        return out

    def _encode_multi(self, pairs, batch_size, devices, show_progress_bar) -> torch.Tensor:
        import concurrent.futures as cf
        import multiprocessing as mp
        import tempfile

        tmp = None
        spec = self._load_spec
        if spec is not None and self._weights_fingerprint() != self._load_fingerprint:
            spec = None  # trained, cast, merged or re-patched since it loaded: the folder is stale
        if spec is None:
            # An in-memory model: write it once, every worker loads the folder (no pickling).
            tmp = tempfile.TemporaryDirectory(prefix="llm2vec_fast_encode_")
            try:
                self.save(tmp.name)
            except BaseException:
                tmp.cleanup()  # not left for the garbage collector
                raise
            spec = dict(base_model_name_or_path=tmp.name, enable_bidirectional=self._is_patched(),
                        dtype=next(self.model.parameters()).dtype)
        spec = dict(spec)
        for k in ENCODER_KEYS:
            spec[k] = getattr(self, k)
        spec["padding_side"] = self.padding_side
        spec["packed"] = self.packed
        spec.pop("device_map", None)
        # Interleave by length so every worker gets a similar amount of work.
        lengths = [len(p[0]) + len(p[1]) for p in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
        shards = [order[w :: len(devices)] for w in range(len(devices))]
        n_threads = max(1, torch.get_num_threads() // len(devices))
        ctx = mp.get_context("spawn")
        try:
            with cf.ProcessPoolExecutor(max_workers=len(devices), mp_context=ctx) as ex:
                futs = [
                    ex.submit(_worker_encode, spec, str(dev), [pairs[i] for i in shard], batch_size,
                              n_threads, show_progress_bar and w == 0)
                    for w, (dev, shard) in enumerate(zip(devices, shards))
                ]
                parts = [f.result() for f in futs]
        finally:
            if tmp is not None:
                tmp.cleanup()
        C = next(p.shape[1] for p in parts if p.size)
        out = torch.empty(len(pairs), C, dtype=torch.float32)
        for shard, part in zip(shards, parts):
            if shard:
                out[torch.tensor(shard)] = torch.from_numpy(part)
        return out

    def _weights_fingerprint(self):
        """What the workers of a multi-device encode must reproduce: the attention mode, each
        state-dict entry's name, dtype and shape, and its values' fp64 sum and norm (one read
        of the weights; in-place edits through ``.data`` bump no version counter)."""
        names, stats = [], []
        for name, t in self.model.state_dict().items():
            t = t.detach()
            names.append((name, str(t.dtype), tuple(t.shape)))
            if t.device.type == "meta":  # offloaded (device_map): no values here to read
                continue
            s = t.sum(dtype=torch.float64)
            n = torch.linalg.vector_norm(t, dtype=torch.float64) if t.is_floating_point() else torch.zeros_like(s)
            stats.append(torch.stack((s, n)).cpu())
        return self._is_patched(), tuple(names), tuple(tuple(x.tolist()) for x in stats)

    def _is_patched(self) -> bool:
        try:
            from .hf.patch import is_patched
        except ImportError:  # pragma: no cover - an older patch module
            return getattr(self._base_model(), "_llm2vec_fast_patch", None) is not None
        try:
            return is_patched(self.model)
        except ValueError:  # not a transformers model (a user's own module): never patched
            return False


def _worker_encode(spec, device, pairs, batch_size, n_threads, show_progress_bar):
    """Runs in a spawned process: load the encoder on ``device`` and embed ``pairs``."""
    if not pairs:
        return np.zeros((0, 0), dtype=np.float32)
    torch.set_num_threads(n_threads)
    spec = dict(spec)
    base = spec.pop("base_model_name_or_path")
    enc = LLM2Vec.from_pretrained(base, **spec)
    enc.model.to(device)
    return enc._encode_local(pairs, batch_size, torch.device(device), show_progress_bar).numpy()


def _save_pretrained_dequantized(model, path) -> None:
    """``save_pretrained`` that also works for a model loaded from a GGUF file.

    transformers refuses to save a GGUF-loaded model ("not serializable"), yet its weights
    are plain de-quantised tensors after loading; hiding the quantizer for the duration of
    the call writes them as ordinary safetensors (and a config without quantization_config).
    """
    hf = model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model
    q = getattr(hf, "hf_quantizer", None)
    method = getattr(getattr(q, "quantization_config", None), "quant_method", None)
    if q is None or str(getattr(method, "value", method)).lower() != "gguf":
        model.save_pretrained(path, safe_serialization=True)
        return
    cfg = hf.config
    had_qc = "quantization_config" in cfg.__dict__
    qc = cfg.__dict__.get("quantization_config")
    try:
        hf.hf_quantizer = None
        if had_qc:
            del cfg.__dict__["quantization_config"]
        model.save_pretrained(path, safe_serialization=True)
    finally:
        hf.hf_quantizer = q
        if had_qc:
            cfg.__dict__["quantization_config"] = qc


def _abs_if_dir(path):
    """An absolute path for a local folder or file (a ``.gguf`` one), so a saved config
    outlives the working directory; hub names pass through."""
    return os.path.abspath(path) if isinstance(path, str) and os.path.exists(path) else path


def _read_saved_config(path) -> dict:
    """Encoder settings saved next to a model (ours, else the original package's)."""
    if not isinstance(path, str) or not os.path.isdir(path):
        return {}
    for name in (CONFIG_NAME, ORIGINAL_CONFIG_NAME):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p) as f:
                return json.load(f)
    return {}

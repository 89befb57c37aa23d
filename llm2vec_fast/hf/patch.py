"""``patch_model`` / ``unpatch_model``: bidirectional Hugging Face decoders through public APIs only.

What patching does, all of it undone exactly by :func:`unpatch_model`:

1. registers :func:`~llm2vec_fast.hf.attention.llm2vec_attention` and its mask function
   with transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` as
   ``"llm2vec_fast"`` and switches the model to it (``set_attn_implementation``);
2. sets ``config.is_causal = False`` and ``is_causal = False`` on every attention module
   (and records the backend on each of them);
3. adds a forward pre-hook on the base model that, when an attention mask is passed
   without ``position_ids``, derives the positions from the mask (each sequence's first
   valid token at 0, so left padding does not shift rotary positions), turns the mask to
   bool once (so every layer and every mask type reuse one padding structure) and
   defaults ``use_cache`` to False (a KV cache is meaningless for a bidirectional encoder;
   a step that decodes with one, as ``generate()`` does by default, raises ``ValueError``);
4. with ``mntp=True`` on an ``XForCausalLM``, replaces the instance's ``forward`` with
   one computing the MNTP loss by :func:`llm2vec_fast.masked_linear_cross_entropy`;
5. with ``fuse_lora`` ``"auto"`` (the default: CPU inputs only) or True (every device), gives
   gated MLPs, RMSNorms and peft LoRA projections instance ``forward`` methods that keep less
   for the backward (:mod:`llm2vec_fast.hf.lora`);
   LoRA modules peft adds after patching are picked up by the pre-hook of (3).

No modeling code is copied and no private transformers function is called. Sliding-window
configs get full bidirectional attention (the original LLM2Vec's behaviour).
"""
from __future__ import annotations

import inspect

import torch

from .._tensor_cache import new_generation_eager
from ..ops._dispatch import warn_once

# The one table of supported architectures: model_type -> what is special about it.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama 2/3, SmolLM2, Sheared-LLaMA",
    "mistral": "sliding window ignored: full bidirectional attention",
    "qwen2": "sliding window ignored: full bidirectional attention",
    "qwen3": "sliding window ignored: full bidirectional attention",
    "gemma": "",
    "gemma2": "attention softcap and final-logit softcap; sliding layers get full attention",
    "phi3": "sliding window ignored: full bidirectional attention",
}
BACKENDS = ("auto", "torch", "triton", "flash_attn")
_STATE_ATTR = "_llm2vec_fast_patch"
_FUSION_ATTR = "_llm2vec_fast_fusion"


class _PatchState:
    """Everything needed to undo a patch exactly."""

    def __init__(self, backend, mntp, fuse_lora):
        self.backend = backend
        self.mntp = mntp
        self.fuse_lora = fuse_lora
        self.lora = None
        self.attn_impl = None
        self.had_is_causal = False
        self.config_is_causal = None
        self.module_is_causal: list[tuple[torch.nn.Module, object]] = []
        self.hook = None
        self.had_forward_attr = False
        self.forward_attr = None


def _unwrap(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    inner = model
    if hasattr(inner, "get_base_model") and callable(inner.get_base_model):
        inner = inner.get_base_model()  # PeftModel -> the XModel / XForCausalLM it wraps
    from transformers import PreTrainedModel

    if not isinstance(inner, PreTrainedModel):
        raise ValueError(
            f"model: expected a transformers PreTrainedModel (or a peft model wrapping one), got {type(model).__name__}"
        )
    return inner


def _check_supported(hf) -> str:
    model_type = getattr(hf.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model: model_type {model_type!r} ({type(hf).__name__}) is not supported by patch_model; "
            f"supported model types: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def _param_index(fn, name):
    params = list(inspect.signature(fn).parameters.values())
    for i, p in enumerate(params):
        if p.name == name:
            return i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else None
    return None


class _PositionsHook:
    """The patched model's forward pre-hook (:func:`_make_positions_hook`). Deep copies share
    it (it holds no model state). Pickling a patched model (``torch.save(model)``) is refused
    with a clear error: its instance forwards and hooks are not meant to travel."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, module, args, kwargs):
        return self.fn(module, args, kwargs)

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise TypeError(NOT_PICKLABLE)


NOT_PICKLABLE = ("a model patched by llm2vec_fast cannot be pickled (torch.save(model) of the whole module): "
                 "save its weights with save_pretrained() or LLM2Vec.save() and patch again after loading, "
                 "or unpatch_model() first")


def _make_positions_hook(base):
    i_mask = _param_index(base.forward, "attention_mask")
    i_pos = _param_index(base.forward, "position_ids")
    cache_names = ("cache", "past_key_values")

    def get(args, kwargs, name, idx):
        if name in kwargs:
            return kwargs[name]
        if idx is not None and idx < len(args):
            return args[idx]
        return None

    def put(args, kwargs, name, idx, value):
        if idx is not None and idx < len(args):
            args = args[:idx] + (value,) + args[idx + 1:]
        else:
            kwargs[name] = value
        return args

    def hook(module, args, kwargs):
        # what inference-mode masks gave is trusted for this forward only (eagerly, so a compiled
        # model does not guard on the counter: a graph break at the start of its forward)
        new_generation_eager()
        fusion = module.__dict__.get(_FUSION_ATTR)  # looked up on the module: right in a deepcopy
        if fusion is not None:
            fusion.sync()
        mask = get(args, kwargs, "attention_mask", i_mask)
        if kwargs.get("use_cache") is None:
            kwargs["use_cache"] = False
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return args, kwargs
        if mask.dtype != torch.bool:
            # Converted once here, so transformers' own .to(bool) returns this very object and
            # every layer / mask type finds the cached padding structure.
            mask = mask.to(torch.bool)
            args = put(args, kwargs, "attention_mask", i_mask, mask)
        past = next((kwargs[n] for n in cache_names if kwargs.get(n) is not None), None)
        past_len = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        if get(args, kwargs, "position_ids", i_pos) is None and past_len == 0:
            pos = (torch.cumsum(mask, dim=1) - 1).clamp_(min=0)
            args = put(args, kwargs, "position_ids", i_pos, pos)
        return args, kwargs

    return _PositionsHook(hook)


def _set_impl(hf, name):
    if hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation(name)
    else:  # pragma: no cover - transformers < 4.56
        hf.config._attn_implementation = name


def patch_model(model, *, backend: str = "auto", mntp: bool = False, fuse_lora: bool | str = "auto"):
    """Make every attention layer of ``model`` bidirectional, in place, and return ``model``.

    Args:
        model: a transformers ``XModel`` or ``XForCausalLM`` whose ``config.model_type`` is
            in :data:`SUPPORTED_MODEL_TYPES`, or a peft ``PeftModel`` wrapping one.
        backend: ``"auto"`` (Triton kernels for CUDA tensors, the PyTorch reference
            elsewhere), ``"torch"``, ``"triton"`` or ``"flash_attn"`` (when importable).
        mntp: also compute ``XForCausalLM``'s loss with the fused masked cross-entropy
            (only labelled rows reach the LM head; ``logits`` is None when labels are given).
        fuse_lora: ``True``: in training (autograd recording, no autocast), run gated MLPs,
            RMSNorms and vanilla peft LoRA projections on frozen weights through autograd
            functions that save about a third of what peft's modules save, with dropout
            masks regenerated from seeds (see :mod:`llm2vec_fast.hf.lora`). Results equal
            peft's up to rounding; dropout draws differ from peft's (same distribution).
            Other cases run unchanged. ``"auto"`` (default): the same for CPU inputs only
            (on the CPU it cut MNTP peak memory 0.45x and time 0.8x; on an H200 the MNTP step
            ran 1.19x slower fused). ``False``: never.

    Inputs the patched model handles: padded batches (``attention_mask (B, T)``, left or
    right padding; positions derived from the mask when ``position_ids`` is not given),
    packed padding-free batches (``position_ids`` restarting at 0, or transformers'
    ``cu_seq_lens_q/k``, ``max_length_q/k`` keywords), GQA, Gemma2's softcap, attention
    dropout in training (the reference runs it where a kernel has none, with a one-time
    warning). Patching a patched model with the same arguments does nothing; other
    arguments re-patch.

    ``torch.compile`` of a patched model runs with graph breaks, not ``fullgraph=True``: at
    the start of each forward (the pre-hook's cache generation, run eagerly) and where the
    padding or packing structure is read on the host (once per forward); the attention
    kernels are custom ops inside the graphs, and later calls reuse the first call's graphs.

    Raises ``ValueError`` for an unsupported model type (listing the supported ones), an
    unknown backend, or ``mntp=True`` on a model without an LM head.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if not isinstance(mntp, bool):
        raise ValueError(f"mntp: expected a bool, got {mntp!r}")
    if not (isinstance(fuse_lora, bool) or fuse_lora == "auto"):
        raise ValueError(f"fuse_lora: expected True, False or 'auto', got {fuse_lora!r}")
    hf = _unwrap(model)
    _check_supported(hf)
    if backend == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise ValueError(f"backend='flash_attn': flash_attn is not importable ({e})") from e
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if mntp and (head is None or hf.base_model is hf):
        raise ValueError(f"mntp=True: expected an XForCausalLM with an LM head, got {type(hf).__name__}")
    old = getattr(hf, _STATE_ATTR, None)
    if old is not None:
        if old.backend == backend and old.mntp == mntp and old.fuse_lora == fuse_lora:
            return model
        unpatch_model(model)

    from . import attention as attn
    from .mntp import make_mntp_forward

    attn.register()
    state = _PatchState(backend, mntp, fuse_lora)
    config = hf.config
    state.attn_impl = config._attn_implementation
    state.had_is_causal = "is_causal" in config.__dict__
    state.config_is_causal = config.__dict__.get("is_causal")
    base = hf.base_model
    try:
        for m in hf.modules():
            # The attention modules: transformers' SDPA / flash integrations read their flag.
            if isinstance(getattr(m, "is_causal", None), bool):
                state.module_is_causal.append((m, m.is_causal))
        _set_impl(hf, attn.NAME)
        config.is_causal = False
        for m, _ in state.module_is_causal:
            m.is_causal = False
            setattr(m, attn.BACKEND_ATTR, backend)
        if fuse_lora:
            from .lora import LoraFusion

            state.lora = LoraFusion(hf, cpu_only=fuse_lora == "auto")
            object.__setattr__(base, _FUSION_ATTR, state.lora)
        state.hook = base.register_forward_pre_hook(_make_positions_hook(base), with_kwargs=True)
        if mntp:
            state.had_forward_attr = "forward" in hf.__dict__
            state.forward_attr = hf.__dict__.get("forward")
            ce_backend = backend if backend in ("torch", "triton") else "auto"
            hf.forward = make_mntp_forward(hf, hf.forward, backend=ce_backend)
    except Exception:
        object.__setattr__(hf, _STATE_ATTR, state)
        unpatch_model(model)
        raise
    # A plain attribute (not a submodule, not a parameter): invisible to state_dict.
    object.__setattr__(hf, _STATE_ATTR, state)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False:
        warn_once(
            f"hf-sliding-{config.model_type}",
            f"patch_model: {config.model_type} has a sliding window ({config.sliding_window}); the patched model "
            "uses full bidirectional attention in every layer, as LLM2Vec did",
        )
    return model


def is_patched(model) -> bool:
    """Whether :func:`patch_model` has patched ``model`` (or the model inside a peft wrapper)."""
    return getattr(_unwrap(model), _STATE_ATTR, None) is not None


def unpatch_model(model):
    """Undo :func:`patch_model` exactly (attention implementation, causality, hooks, forward).

    A model that was never patched is returned unchanged.
    """
    hf = _unwrap(model)
    state = getattr(hf, _STATE_ATTR, None)
    if state is None:
        return model
    from .attention import BACKEND_ATTR

    if state.hook is not None:
        state.hook.remove()
    if state.lora is not None:
        state.lora.remove()
        hf.base_model.__dict__.pop(_FUSION_ATTR, None)
    if state.mntp and "forward" in hf.__dict__:
        if state.had_forward_attr:
            hf.forward = state.forward_attr
        else:
            del hf.__dict__["forward"]
    for m, flag in state.module_is_causal:
        m.is_causal = flag
        if BACKEND_ATTR in m.__dict__:
            delattr(m, BACKEND_ATTR)
    config = hf.config
    if state.had_is_causal:
        config.is_causal = state.config_is_causal
    elif "is_causal" in config.__dict__:
        del config.__dict__["is_causal"]
    if state.attn_impl is not None and config._attn_implementation != state.attn_impl:
        _set_impl(hf, state.attn_impl)
    object.__delattr__(hf, _STATE_ATTR)
    return model

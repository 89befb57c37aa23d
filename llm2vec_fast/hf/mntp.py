"""MNTP loss for a patched ``XForCausalLM``: masked next-token cross-entropy without full logits.

Shapes: ``B`` batch, ``T`` tokens, ``C`` hidden size, ``V`` vocabulary.

``patch_model(..., mntp=True)`` replaces the instance's ``forward`` (an instance attribute,
removed again by ``unpatch_model``; the class is untouched). With ``labels`` the wrapper
runs the base model, then :func:`llm2vec_fast.masked_linear_cross_entropy` on the final
hidden states and the LM head's weight: only labelled rows reach the LM head, so no
``(B, T, V)`` logits tensor exists, and the output carries ``loss`` and ``logits=None``.
Without labels it calls the original forward unchanged.
"""
from __future__ import annotations

import inspect
import types

import torch

# Arguments of XForCausalLM.forward that concern the logits / loss, not the base model.
_HEAD_ONLY = ("labels", "logits_to_keep", "num_items_in_batch", "shift_labels", "return_dict", "ignore_index",
              "num_labelled")


def lm_head_operands(hidden: torch.Tensor, head: torch.nn.Module):
    """``(hidden, weight, bias)`` in the dtype transformers' LM head would compute in.

    Under ``torch.autocast`` that is the autocast dtype (``nn.Linear`` is on autocast's
    16-bit list; HF Trainer's ``bf16=True`` over fp32 weights), whatever the hidden states'
    and the head's own dtypes; otherwise the hidden states' dtype (a head kept in fp32 on a
    16-bit model is cast to it). The fused loss accumulates in fp32 either way.
    """
    dev = hidden.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    weight, bias = head.weight, getattr(head, "bias", None)
    return hidden.to(dt), weight.to(dt), (bias.to(dt) if bias is not None else None)


def per_item(loss_sum: torch.Tensor, num_items) -> torch.Tensor:
    """A summed loss over Trainer's ``num_items_in_batch`` (int or tensor); a step with no
    labelled token gives 0, not 0 / 0 = NaN."""
    if isinstance(num_items, torch.Tensor):
        return loss_sum / num_items.to(loss_sum.device).clamp_min(1)
    return loss_sum / max(num_items, 1)


def make_mntp_forward(model, original_forward, backend: str = "auto"):
    """A bound ``forward`` for ``model`` (an ``XForCausalLM``) computing the MNTP loss fused.

    The loss equals transformers' ``ForCausalLMLoss`` on full logits: label ``t`` is
    predicted from the hidden state at ``t - 1`` (``shift_labels`` given: no shift), mean
    over labelled tokens, or the sum divided by ``num_items_in_batch`` when the Trainer
    passes it (gradient accumulation); ``ignore_index`` (default -100, as there) marks the
    unlabelled tokens and goes to the loss only, not to the base model; so does
    ``num_labelled`` (an int: how many labels the loss uses, those of ``labels[:, 1:]`` or of
    ``shift_labels`` that are not ``ignore_index``), which lets the loss find them without a
    host sync (:func:`llm2vec_fast.masked_linear_cross_entropy`). Gemma2's
    ``final_logit_softcapping`` is applied. The head runs in the dtype transformers' would
    (:func:`lm_head_operands`: the autocast dtype under ``torch.autocast``).

    Output: a ``CausalLMOutputWithPast`` with ``logits=None``; with ``return_dict=False``
    (passed, or the config's ``return_dict``) a tuple that keeps that ``None`` in the
    logits' place: ``(loss, None, *rest)`` where transformers gives ``(loss, logits,
    *rest)``, ``rest`` being the same non-None fields in the same order (cache, hidden
    states, attentions). ``ModelOutput.to_tuple`` would drop the ``None`` and shift
    everything after it one place left, so ``outputs[1]`` would be the cache, not the
    logits; keeping the place means index-based code reads the same fields as without the
    patch (and finds no logits where it asks for them).
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ..ops.masked_ce import masked_linear_cross_entropy

    sig = inspect.signature(original_forward)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    base_params = inspect.signature(model.base_model.forward).parameters
    base_takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in base_params.values())
    cache_field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    # Bound to the model (a method, not a closure over it), so a deepcopy of the patched model
    # rebinds it to the copy; the class's forward unless the model had an instance forward.
    class_forward = type(model).forward
    unbound = getattr(original_forward, "__func__", None) is class_forward

    def forward(self, *args, **kwargs):
        original = class_forward.__get__(self) if unbound else original_forward
        base = self.base_model
        bound = sig.bind(*args, **kwargs)
        named = dict(bound.arguments)
        extra = named.pop(var_kw, {}) if var_kw else {}
        named.update(extra)
        labels = named.get("labels")
        shift_labels = named.get("shift_labels")
        if labels is None and shift_labels is None:
            return original(*args, **kwargs)
        return_dict = named.get("return_dict")
        if return_dict is None:  # as transformers' can_return_tuple: the config decides
            return_dict = getattr(self.config, "return_dict", True)
        num_items = named.get("num_items_in_batch")
        ignore_index = named.get("ignore_index", -100)
        base_kwargs = {
            n: val for n, val in named.items()
            if n not in _HEAD_ONLY and (n in base_params or base_takes_var_kw)
        }
        outputs = base(**base_kwargs)
        hidden = outputs[0]
        hidden, weight, bias = lm_head_operands(hidden, self.get_output_embeddings())
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if shift_labels is not None:
            target, shift = shift_labels, 0
        else:
            target, shift = labels, 1
        target = target.to(hidden.device)
        reduction = "sum" if num_items is not None else "mean"
        loss = masked_linear_cross_entropy(
            hidden, weight, target, bias, shift=shift, ignore_index=ignore_index, reduction=reduction,
            softcap=softcap, backend=backend, num_labelled=named.get("num_labelled"),
        )
        if num_items is not None:
            loss = per_item(loss, num_items)
        fields = dict(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                      attentions=getattr(outputs, "attentions", None))
        fields[cache_field] = getattr(outputs, "cache", None) if hasattr(outputs, "cache") else getattr(
            outputs, "past_key_values", None)
        out = CausalLMOutputWithPast(**fields)
        if return_dict:
            return out
        # to_tuple() drops None fields: put logits' None back in its place (see the docstring)
        return (loss, None) + out.to_tuple()[1:]

    if not unbound:  # an instance forward was there before: a closure over this model
        def closure(*args, **kwargs):
            return forward(model, *args, **kwargs)

        closure.__wrapped__ = original_forward
        closure.llm2vec_fast_mntp = True
        return closure
    # inspect.signature (peft, Trainer) follows __wrapped__: the class forward, self included,
    # which the bound method then drops
    forward.__wrapped__ = class_forward
    forward.llm2vec_fast_mntp = True
    return types.MethodType(forward, model)

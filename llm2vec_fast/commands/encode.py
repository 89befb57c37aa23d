"""``llm2vec-fast encode``: embed the lines of a text file into a ``.npy`` matrix."""
from __future__ import annotations

import os
import re

from . import UsageError

HELP = "embed a text file (one text per line) into an (N, C) float32 .npy matrix"

DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(p) -> None:
    """Options shared with ``eval-sts``: which model, how it is loaded and pooled."""
    p.add_argument("--model", default="smollm2-135m",
                   help="base model folder / hub name / .gguf file, or a folder written by LLM2Vec.save "
                        "(default: smollm2-135m, the offline SmolLM2-135M-Instruct)")
    p.add_argument("--peft", default=None, help="a LoRA adapter folder to load on top of --model")
    p.add_argument("--causal", action="store_true",
                   help="keep causal attention (do not make the model bidirectional); default: what a folder "
                        "written by LLM2Vec.save recorded, else bidirectional")
    p.add_argument("--pooling", default=None,
                   choices=("mean", "weighted_mean", "last_token", "eos_token", "bos_token"),
                   help="pooling mode (default: the saved one, else mean)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="tokens per input (default 512)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights' dtype; bfloat16 is about 2x faster on CPUs with AVX512-BF16/AMX and on GPUs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--devices", default=None,
                   help="comma-separated devices, one worker process each (e.g. cuda:0,cuda:1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")


def add_arguments(p) -> None:
    p.add_argument("--input", required=True, help="UTF-8 text file, one text per line")
    p.add_argument("--output", required=True,
                   help="where to write the (N, C) float32 matrix: a .npy path (.npy is added to a name "
                        "without a suffix; other suffixes are refused); its folder must exist")
    p.add_argument("--instruction", default="",
                   help="instruction paired with every text (attended to, excluded from pooling)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_model_arguments(p)


# What huggingface_hub accepts as a repo id ("name" or "namespace/name"); anything else
# that is not an existing folder cannot load.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


# What a folder needs to load: a transformers config or an encoder config (an adapter saved
# by LLM2Vec.save names its base there); an adapter folder (--peft) needs peft's config.
_MODEL_FILES = ("config.json", "llm2vec_fast_config.json", "llm2vec_config.json")
_ADAPTER_FILES = ("adapter_config.json",)


def _check_model_path(option: str, name: str, needs=_MODEL_FILES) -> None:
    """``name`` must be a folder holding one of ``needs``, a known alias or a hub id: a local
    path that does not exist (absolute, ``./x``, ``~/x``, ``a/b/c``), a file or a folder
    without a model is refused before anything loads."""
    from llm2vec_fast.models import resolve_model_name

    if os.path.isdir(name):
        if not any(os.path.isfile(os.path.join(name, f)) for f in needs):
            raise UsageError(f"{option}: {name} holds no model (none of {', '.join(needs)})")
        return
    if os.path.exists(name):
        if needs is _MODEL_FILES and name.lower().endswith(".gguf"):
            return  # GGUF weights (and tokenizer) in one file, as transformers loads them
        raise UsageError(f"{option}: {name} is a file; expected a model folder, a .gguf file or a hub name")
    if resolve_model_name(name)[0] != name:  # an alias of the offline default model
        return
    if not _HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        raise UsageError(f"{option}: no such folder: {name}")


def check_model_arguments(args) -> None:
    """The shared options' values, checked before the model loads (heavy imports come later)."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:
        raise UsageError(f"--max-length: expected an int >= 1, got {args.max_length}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads: expected an int >= 1, got {args.threads}")
    if args.device is not None:
        _check_device("--device", args.device)
    if args.devices is not None:
        for device in args.devices.split(","):
            if device.strip():
                _check_device("--devices", device.strip())
    _check_model_path("--model", args.model)
    if args.peft is not None:
        _check_model_path("--peft", args.peft, _ADAPTER_FILES)


def _check_device(option: str, value: str) -> None:
    """``value`` must parse as a ``torch.device`` whose backend is usable here: ``cpu``, or
    ``cuda`` / ``cuda:N`` (and the like: ``mps``, ``xpu``) when that backend is available and,
    with an index, has that many devices. Checked before loading, so a typo or a machine
    without the accelerator is a one-line error, not a traceback after the model loaded."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is not None and device.type == "cpu":
        return
    backend = getattr(torch, device.type, None) if device is not None else None
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available):  # not a device type, or one (meta, ...) that cannot run a model
        raise UsageError(f"{option}: expected a device such as cpu, cuda or cuda:1, got {value!r}")
    if not is_available():
        what = "CUDA" if device.type == "cuda" else device.type
        raise UsageError(f"{option}: {value}: {what} is not available on this machine")
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        n = count()
        raise UsageError(f"{option}: {value}: this machine has {n} {device.type} device{'s' if n != 1 else ''} "
                         f"({device.type}:0 to {device.type}:{n - 1})")


def load_encoder(args):
    """Build an LLM2Vec from the shared options (heavy imports happen here). A model that
    cannot be found (a folder without model or tokenizer files, an unknown or unreachable hub
    name, a saved adapter whose base is missing) is a one-line :class:`UsageError` naming the
    option; any other failure while loading is raised as it is, with its traceback."""
    import torch

    from llm2vec_fast.encoder import LLM2Vec

    if args.threads:
        torch.set_num_threads(args.threads)
    kw = {"dtype": getattr(torch, args.dtype)}
    if args.pooling:
        kw["pooling_mode"] = args.pooling
    if args.max_length:
        kw["max_length"] = args.max_length
    try:
        # --causal forces causal attention; otherwise None: what a saved encoder recorded
        # (a saved causal encoder stays causal), else bidirectional
        enc = LLM2Vec.from_pretrained(args.model, peft_model_name_or_path=args.peft,
                                      enable_bidirectional=False if args.causal else None, **kw)
    except (OSError, ValueError) as e:
        reason = _not_found(e, args)
        if reason is None:
            raise
        what = "--model / --peft" if args.peft else "--model"
        names = f"{args.model}" + (f" / {args.peft}" if args.peft else "")
        raise UsageError(f"{what}: cannot load {names}: {reason}") from e
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    if not devices:
        enc.model.to(device)
    return enc, devices


# transformers' messages (plain OSError) when a model's files cannot be found or fetched
_NOT_FOUND_MESSAGES = (
    "is not a local folder and is not a valid model identifier", "couldn't connect to",
    "does not appear to have a file named", "does not appear to have files named", "no file named",
    "can't load tokenizer", "can't load the configuration", "is not a valid git identifier", "gated repo",
    "names no base model",  # LLM2Vec.from_pretrained: an adapter folder without its base model's name
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


def _not_found(e: BaseException, args) -> str | None:
    """The one-line reason when ``e`` (raised by from_pretrained) says the model's files could
    not be found or fetched; None for anything else (a fault to show with its traceback)."""
    for name in (args.model, args.peft):  # a local folder that lacks what loading needs
        if name and os.path.isdir(name):
            files = os.listdir(name)
            has_tokenizer = any(f in _TOKENIZER_FILES or f.endswith(".gguf") for f in files)  # GGUF: inside
            if name == args.model and not has_tokenizer:
                return f"{name} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)})"
            if not any(f.endswith(_WEIGHT_SUFFIXES) for f in files) and not _adapter_only(name):
                return f"{name} holds no weights (no *.safetensors / *.bin file)"
    try:
        from huggingface_hub import errors as hub
        hub_errors = (hub.HfHubHTTPError, hub.EntryNotFoundError, hub.HFValidationError, hub.OfflineModeIsEnabled)
    except Exception:  # pragma: no cover - an older huggingface_hub
        hub_errors = ()
    x: BaseException | None = e
    while x is not None:  # the error and what it was raised from
        if isinstance(x, (FileNotFoundError, ConnectionError, *hub_errors)) or type(x).__name__ in (
                "ConnectError", "ConnectTimeout", "ConnectionError"):  # httpx's, requests' (not builtins)
            break
        if isinstance(x, (OSError, ValueError)) and any(m in str(x).lower() for m in _NOT_FOUND_MESSAGES):
            break
        x = x.__cause__
    else:
        return None
    return " ".join(str(e).split()) or type(e).__name__


def _adapter_only(folder: str) -> bool:
    """A folder written by LLM2Vec.save of an unmerged adapter: its weights are the base's."""
    from llm2vec_fast.encoder import _read_saved_config

    return bool(_read_saved_config(folder).get("adapter_only"))


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f]
    return lines


def read_input(path: str) -> list[str]:
    """The lines of ``--input``; an unreadable, non-UTF-8 or empty file is a UsageError."""
    try:
        texts = read_lines(path)
    except OSError as e:
        raise UsageError(f"--input: cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"--input: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not texts:
        raise UsageError(f"--input: {path} holds no lines to embed")
    return texts


def output_path(path: str) -> str:
    """The file ``--output`` names, checked before any work: ``.npy`` is the only format, so a
    name without a suffix gets ``.npy`` (what ``np.save`` would write) and another suffix
    is refused; the folder must exist and be writable, and the path must not be a folder."""
    if not os.path.basename(path):
        raise UsageError(f"--output: expected a .npy file path, got the folder {path}")
    ext = os.path.splitext(path)[1]
    if ext == "":
        path += ".npy"
    elif ext.lower() != ".npy":
        raise UsageError(f"--output: expected a .npy path (the only format written), got {path}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        probe = folder  # the nearest ancestor that exists (below a file nothing does)
        while not os.path.lexists(probe):
            probe = os.path.dirname(probe)
        why = f"{probe} is a file, not a folder" if not os.path.isdir(probe) else f"folder {folder} does not exist"
        raise UsageError(f"--output: cannot write {path}: {why}")
    if os.path.isdir(path):
        raise UsageError(f"--output: {path} is a folder; expected a .npy file path")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"--output: cannot write {path}: permission denied")
    return path


def run(args) -> int:
    check_model_arguments(args)
    out = output_path(args.output)
    texts = read_input(args.input)
    import numpy as np

    enc, devices = load_encoder(args)
    inputs = [[args.instruction, t] for t in texts] if args.instruction else texts
    emb = enc.encode(inputs, batch_size=args.batch_size, show_progress_bar=not args.no_progress,
                     convert_to_numpy=True, normalize_embeddings=args.normalize, devices=devices)
    try:
        with open(out, "wb") as f:  # a file object: np.save writes exactly this path
            np.save(f, emb.astype(np.float32))
    except OSError as e:
        raise UsageError(f"--output: cannot write {out}: {e.strerror or e}") from e
    print(f"wrote {out}: {emb.shape[0]} x {emb.shape[1]} float32")
    return 0

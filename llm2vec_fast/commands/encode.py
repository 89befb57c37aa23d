"""``llm2vec-fast encode``: embed the lines of a text file into a ``.npy`` matrix."""
from __future__ import annotations

HELP = "embed a text file (one text per line) into an (N, C) float32 .npy matrix"

DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(p) -> None:
    """Options shared with ``eval-sts``: which model, how it is loaded and pooled."""
    p.add_argument("--model", default="smollm2-135m",
                   help="base model folder / hub name, or a folder written by LLM2Vec.save "
                        "(default: smollm2-135m, the offline SmolLM2-135M-Instruct)")
    p.add_argument("--peft", default=None, help="a LoRA adapter folder to load on top of --model")
    p.add_argument("--causal", action="store_true", help="keep causal attention (do not make the model bidirectional)")
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
    p.add_argument("--output", required=True, help="where to write the .npy matrix (N, C) float32")
    p.add_argument("--instruction", default="",
                   help="instruction paired with every text (attended to, excluded from pooling)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_model_arguments(p)


def load_encoder(args):
    """Build an LLM2Vec from the shared options (heavy imports happen here)."""
    import torch

    from llm2vec_fast.encoder import LLM2Vec

    if args.threads:
        torch.set_num_threads(args.threads)
    kw = {"dtype": getattr(torch, args.dtype)}
    if args.pooling:
        kw["pooling_mode"] = args.pooling
    if args.max_length:
        kw["max_length"] = args.max_length
    enc = LLM2Vec.from_pretrained(args.model, peft_model_name_or_path=args.peft,
                                  enable_bidirectional=not args.causal, **kw)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    if not devices:
        enc.model.to(device)
    return enc, devices


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f]
    return lines


def run(args) -> int:
    import numpy as np

    if args.batch_size < 1:
        raise SystemExit(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    texts = read_lines(args.input)
    if not texts:
        raise SystemExit(f"--input: {args.input} holds no lines to embed")
    enc, devices = load_encoder(args)
    inputs = [[args.instruction, t] for t in texts] if args.instruction else texts
    emb = enc.encode(inputs, batch_size=args.batch_size, show_progress_bar=not args.no_progress,
                     convert_to_numpy=True, normalize_embeddings=args.normalize, devices=devices)
    np.save(args.output, emb.astype(np.float32))
    print(f"wrote {args.output}: {emb.shape[0]} x {emb.shape[1]} float32")
    return 0

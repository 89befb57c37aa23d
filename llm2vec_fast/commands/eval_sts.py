"""``llm2vec-fast eval-sts``: STS-Benchmark Spearman x100 of an encoder (offline data)."""
from __future__ import annotations

from . import UsageError
from .encode import add_model_arguments, check_model_arguments, load_encoder

HELP = "print the STS-B Spearman correlation x100 (cosine similarity of the embeddings)"


def add_arguments(p) -> None:
    p.add_argument("--split", default="test", choices=("train", "dev", "test"))
    p.add_argument("--max-pairs", type=int, default=None,
                   help="evaluate the first N pairs only (a fixed subset; N >= 2, Spearman needs two pairs)")
    p.add_argument("--instruction", default="", help="instruction paired with every sentence")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    add_model_arguments(p)


def run(args) -> int:
    import time

    if args.max_pairs is not None and args.max_pairs < 2:
        raise UsageError(f"--max-pairs: expected an int >= 2 (Spearman needs two pairs), got {args.max_pairs}")
    check_model_arguments(args)

    from llm2vec_fast.evaluation import evaluate_sts

    enc, devices = load_encoder(args)
    t0 = time.perf_counter()
    if devices:
        class _Multi:  # evaluate_sts calls encode(); route it to the worker processes
            def encode(self, s, **kw):
                return enc.encode(s, devices=devices, **kw)
        target = _Multi()
    else:
        target = enc
    d = evaluate_sts(target, split=args.split, max_pairs=args.max_pairs, batch_size=args.batch_size,
                     instruction=args.instruction, show_progress_bar=args.progress, return_details=True)
    dt = time.perf_counter() - t0
    print(f"STS-B {args.split} Spearman x100: {d['spearman']:.2f}  "
          f"({d['n_pairs']} pairs, {d['n_sentences']} sentences, {dt:.1f} s)")
    return 0

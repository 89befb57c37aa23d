"""Encode throughput: llm2vec-fast vs the original llm2vec 0.2.3, side by side on this CPU.

Both encode the 2,758 STS-B test sentences (sentence1 then sentence2 of every pair) with
SmolLM2-135M-Instruct, bidirectional attention (``enable_bidirectional=True``, the original's
default), mean pooling, the same batch size and thread count. Each run is a fresh worker
process; the original runs in its own virtual environment (llm2vec 0.2.3, transformers
4.44.2, torch 2.13.0 CPU), ours in the main one. Runs alternate (original, ours fp32, ours
bf16, ...) so a shared, busy CPU slows all of them alike; ratios are per round, reported
with their median.

Setup of the original (once)::

    python -m venv /work/llm2vec-orig-venv
    /work/llm2vec-orig-venv/bin/pip install torch==2.13.0
    /work/llm2vec-orig-venv/bin/pip install llm2vec==0.2.3 transformers==4.44.2 gguf torch==2.13.0

Run (from the repository root, with the main environment's python)::

    python benchmarks/compare_original_encode.py --orig-python /work/llm2vec-orig-venv/bin/python \
        --threads 2 --batch-size 32 --rounds 1

The model is converted once from GGUF to a safetensors folder (fp32) that both load, so
neither side pays the GGUF de-quantisation. Timing covers ``encode`` only (model loaded,
one warm-up batch done). The STS-B Spearman x100 of each run is computed from its
embeddings, which also reports what bf16 changes in the score. One JSON row per run and a
summary row are appended to ``benchmarks/results/encode_vs_original.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --------------------------------------------------------------------------------------
# Worker: runs in either environment; imports only what that environment has
# --------------------------------------------------------------------------------------


def worker(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    with open(args.texts) as f:
        texts = json.load(f)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    causal = args.impl.endswith("-causal")
    if args.impl == "original":
        from llm2vec import LLM2Vec

        enc = LLM2Vec.from_pretrained(args.model, enable_bidirectional=True, pooling_mode="mean",
                                      torch_dtype=dtype)
        kw = {"device": "cpu"}
    else:
        sys.path.insert(0, ROOT)
        from llm2vec_fast import LLM2Vec

        enc = LLM2Vec.from_pretrained(args.model, enable_bidirectional=not causal, pooling_mode="mean", dtype=dtype)
        kw = {}
    load_s = time.perf_counter() - t0
    enc.encode(texts[: args.batch_size], batch_size=args.batch_size, show_progress_bar=False, **kw)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    emb = enc.encode(texts, batch_size=args.batch_size, show_progress_bar=False, **kw)
    enc_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    emb = emb.float().numpy() if hasattr(emb, "numpy") else np.asarray(emb, dtype=np.float32)
    np.save(args.out + ".npy", emb)
    import transformers

    with open(args.out + ".json", "w") as f:
        json.dump({"impl": args.impl, "dtype": args.dtype, "n_texts": len(texts), "encode_s": enc_s,
                   "texts_per_s": len(texts) / enc_s,
                   "cpu_s": cpu_s, "texts_per_cpu_s": len(texts) / cpu_s, "load_s": load_s, "threads": args.threads,
                   "batch_size": args.batch_size, "worker_torch": torch.__version__,
                   "worker_transformers": transformers.__version__}, f)


# --------------------------------------------------------------------------------------
# Driver: main environment
# --------------------------------------------------------------------------------------


def prepare(tmp: str, limit=None) -> tuple[str, str, list]:
    """STS-B test sentences to a JSON file and SmolLM2 to a safetensors folder."""
    sys.path.insert(0, ROOT)
    from llm2vec_fast.data import load_sts_benchmark
    from llm2vec_fast.models import load_default_model

    rows = load_sts_benchmark("test")[:limit]
    texts = [r[0] for r in rows] + [r[1] for r in rows]
    texts_path = os.path.join(tmp, "texts.json")
    with open(texts_path, "w") as f:
        json.dump(texts, f)
    model_dir = os.path.join(tmp, "smollm2")
    from llm2vec_fast import LLM2Vec

    model, tok = load_default_model()
    LLM2Vec(model, tok).save(model_dir)  # writes the de-quantised weights as safetensors
    return texts_path, model_dir, rows


def prepare_original(model_dir: str, orig_python: str, texts_path: str) -> str:
    """The same weights and the same tokenizer for the original's environment.

    tokenizer.json as written by tokenizers 0.2x stores BPE merges as pairs, which the
    original's tokenizers 0.19 cannot parse: the merges are rewritten as "a b" strings and
    the class named PreTrainedTokenizerFast (transformers 5's TokenizersBackend is unknown
    to 4.44). The token ids of every text are then checked to be identical in both
    environments, so both sides encode exactly the same inputs.
    """
    orig_dir = model_dir + "_orig"
    os.makedirs(orig_dir, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        os.symlink(os.path.join(model_dir, name), os.path.join(orig_dir, name))
    with open(os.path.join(model_dir, "tokenizer.json")) as f:
        tj = json.load(f)
    merges = tj["model"].get("merges", [])
    tj["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in merges]
    with open(os.path.join(orig_dir, "tokenizer.json"), "w") as f:
        json.dump(tj, f)
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["model_input_names"] = ["input_ids", "attention_mask"]  # no token_type_ids for a Llama
    with open(os.path.join(orig_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f)
    code = (
        "import sys, json; from transformers import AutoTokenizer; "
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); texts = json.load(open(sys.argv[2])); "
        "print(json.dumps(t(texts)['input_ids']))"
    )
    out = subprocess.run([orig_python, "-c", code, orig_dir, texts_path], check=True, capture_output=True, text=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    from transformers import AutoTokenizer

    with open(texts_path) as f:
        texts = json.load(f)
    ours = AutoTokenizer.from_pretrained(model_dir)(texts)["input_ids"]
    bad = sum(a != b for a, b in zip(ours, theirs))
    if bad:
        raise RuntimeError(f"the original's tokenizer differs from ours on {bad} of {len(texts)} texts")
    return orig_dir


def spearman_of(emb, rows) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    n = len(rows)
    a, b = emb[:n].astype(np.float64), emb[n:].astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(spearmanr(cos, [r[2] for r in rows]).statistic) * 100


IMPLS = ("original", "fast", "fast-causal")
DTYPES = ("float32", "bfloat16")


def _configs(text: str) -> list[tuple[str, str]]:
    """``--configs``: comma-separated ``impl:dtype`` runs (impl in IMPLS, dtype in DTYPES)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        impl, _, dtype = item.partition(":")
        if impl not in IMPLS or dtype not in DTYPES:
            raise argparse.ArgumentTypeError(
                f"expected impl:dtype items, impl in {','.join(IMPLS)} and dtype in {','.join(DTYPES)}, got {item!r}")
        out.append((impl, dtype))
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one impl:dtype, got {text!r}")
    return out


def main(argv=None) -> None:
    sys.path.insert(0, HERE)
    from common import int_at_least, positive_int

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orig-python", default="/work/llm2vec-orig-venv/bin/python")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--rounds", type=positive_int, default=1)
    p.add_argument("--configs", default="original:float32,fast:float32,fast:bfloat16", type=_configs,
                   help="comma-separated impl:dtype runs per round, in this order (impl: original, fast, "
                        "fast-causal; dtype: float32, bfloat16)")
    p.add_argument("--limit", type=int_at_least(2), default=None,
                   help="first N pairs only, N >= 2 (recorded with the limit in the row)")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--out-dir", default=None, help="where encode_vs_original.jsonl is appended (default benchmarks/results)")
    p.add_argument("--record-from-log", default=None,
                   help="record the runs printed to a log by an interrupted driver (rows, summary) and exit")
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--texts", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import numpy as np

    configs = args.configs
    if args.record_from_log:
        with open(args.record_from_log) as f:
            runs = [json.loads(line) for line in f if line.startswith('{"impl"')]
        configs = [c for c in configs if any(r["impl"] == c[0] and r["dtype"] == c[1] for r in runs)]
        args.rounds = 1 + max(r["round"] for r in runs)
        return record(runs, configs, args)
    runs = []
    with tempfile.TemporaryDirectory(prefix="cmp_encode_") as tmp:
        texts_path, model_dir, rows = prepare(tmp, args.limit)
        orig_dir = prepare_original(model_dir, args.orig_python, texts_path) if any(c[0] == "original" for c in configs) else None
        for r in range(args.rounds):
            for impl, dtype in configs:
                out = os.path.join(tmp, f"{impl}_{dtype}_{r}")
                py = args.orig_python if impl == "original" else sys.executable
                cmd = [py, os.path.abspath(__file__), "--worker", "--impl", impl, "--dtype", dtype,
                       "--model", orig_dir if impl == "original" else model_dir, "--texts", texts_path, "--out", out,
                       "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, cwd=ROOT)
                with open(out + ".json") as f:
                    res = json.load(f)
                res["round"] = r
                res["stsb_test_spearman_x100"] = spearman_of(np.load(out + ".npy"), rows)
                res["wall_s"] = time.perf_counter() - t0
                runs.append(res)
                print(json.dumps(res), flush=True)

    record(runs, configs, args)


def record(runs, configs, args) -> None:
    """Print the summary (medians and per-round ratios) and append runs + summary as rows."""
    # The workers' thread count (each run records it; --threads unless recorded from a log),
    # for the summary and the rows' device string: never this driver's own count.
    threads = sorted({x["threads"] for x in runs if x.get("threads")}) or [args.threads]
    threads = threads[0] if len(threads) == 1 else threads
    summary = {"kind": "summary", "threads": threads, "batch_size": args.batch_size, "rounds": args.rounds,
               "n_texts": runs[0]["n_texts"], "model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised)",
               "attention": "bidirectional (fast-causal: causal)", "pooling": "mean"}
    for impl, dtype in configs:
        key = f"{impl}_{dtype}"
        rs = [x for x in runs if x["impl"] == impl and x["dtype"] == dtype]
        summary[f"{key}_texts_per_s"] = statistics.median(x["texts_per_s"] for x in rs)
        summary[f"{key}_spearman"] = rs[0]["stsb_test_spearman_x100"]
    if ("original", "float32") in configs:
        for impl, dtype in configs:
            if impl == "fast":
                ratios = [
                    a["texts_per_s"] / b["texts_per_s"]
                    for a in runs if a["impl"] == impl and a["dtype"] == dtype
                    for b in runs if b["impl"] == "original" and b["dtype"] == "float32" and b["round"] == a["round"]
                ]
                if not ratios:
                    continue
                summary[f"speedup_fast_{dtype}_vs_original_float32"] = statistics.median(ratios)
                summary[f"speedup_fast_{dtype}_per_round"] = ratios
                summary[f"cpu_time_speedup_fast_{dtype}_vs_original_float32"] = statistics.median(
                    b["cpu_s"] / a["cpu_s"]
                    for a in runs if a["impl"] == impl and a["dtype"] == dtype
                    for b in runs if b["impl"] == "original" and b["dtype"] == "float32" and b["round"] == a["round"]
                )
    if "fast_bfloat16_spearman" in summary and "fast_float32_spearman" in summary:
        summary["bf16_spearman_change"] = summary["fast_bfloat16_spearman"] - summary["fast_float32_spearman"]
    print(json.dumps(summary, indent=1))
    summary["limit_pairs"] = args.limit
    if not args.no_record:
        sys.path.insert(0, HERE)
        from common import append_rows

        rows = [dict(kind="run", **x) for x in runs] + [summary]
        by_threads = {}  # one device string per thread count (runs from a log may mix them)
        for row in rows:
            t = row.get("threads")
            by_threads.setdefault(t if isinstance(t, int) else None, []).append(row)
        for t, rs in by_threads.items():
            path = append_rows("encode_vs_original", rs, "cpu", getattr(args, "out_dir", None), threads=t)
        print("appended to", path)


if __name__ == "__main__":
    main()

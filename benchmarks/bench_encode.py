"""Encoding throughput: ``LLM2Vec.encode`` (patched model) against stock transformers with padded batches.

A corpus of texts whose token counts are spread log-uniformly between 10 and 512 (slices of
STS-B sentences, or of random words when that data set is not installed) is embedded with
mean pooling, batch by batch, by two providers that share one model:

- ``stock``: what the original llm2vec does on stock transformers: texts sorted by length,
  padded batches (``max_length`` 512), SDPA with a non-causal (B, 1, T, T) padding mask,
  mean pooling by a Python loop over the batch.
- ``llm2vec_fast``: ``LLM2Vec(patch_model(model), tokenizer).encode(...)``: sorted batches,
  bidirectional attention on unpadded tokens (packed, padding-free batches on CUDA),
  vectorised pooling.

The two alternate rep by rep (the model is patched and unpatched in between), so a change
in machine load hits both. ``min_cos_vs_stock`` is the smallest cosine similarity between
the two providers' embeddings of the same text (ours leaves special tokens out of the mean,
as the original's embed mask does, so it is close to, not exactly, 1).

Models: on the CPU the real SmolLM2-135M-Instruct (fp32, from the offline GGUF; a random
model of its shape with a word-level tokenizer when gguf is missing); on CUDA a 1B-class
Llama config (Llama-3.2-1B's shape) with random weights in bf16 and a word-level tokenizer
(no hub: only the shape matters for speed).

    python benchmarks/bench_encode.py --preset cpu --device cpu
    python benchmarks/bench_encode.py --preset gpu-quick --device cuda
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PRESETS = {
    "cpu": dict(model="smollm2-135m", n_texts=16, batch_size=8, reps=2, dtype="float32", threads=2),
    "gpu-quick": dict(model="llama-1b", n_texts=512, batch_size=64, reps=3, dtype="bfloat16", threads=None),
    "gpu-full": dict(model="llama-1b", n_texts=2048, batch_size=64, reps=5, dtype="bfloat16", threads=None),
}
MIN_LEN, MAX_LEN = 10, 512


def word_tokenizer(words):
    """A fast (Rust) word-level tokenizer over ``words``: offsets work, no download needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side="right",
    )


def source_words(seed: int) -> list[str]:
    try:
        from llm2vec_fast.data import load_sts_benchmark

        return " ".join(s for r in load_sts_benchmark("train") for s in r[:2]).split()
    except Exception:
        import random

        rng = random.Random(seed)
        return [f"w{rng.randrange(8000)}" for _ in range(200_000)]


def make_corpus(tok, n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` texts of ~L tokens each, L log-uniform in [10, 512]: slices of one token stream."""
    import random

    rng = random.Random(seed)
    words = source_words(seed)
    stream = tok(" ".join(words[:60000]), add_special_tokens=False)["input_ids"]
    texts, lens = [], []
    for _ in range(n):
        L = int(round(math.exp(rng.uniform(math.log(MIN_LEN), math.log(MAX_LEN)))))
        s = rng.randrange(0, len(stream) - L)
        texts.append(tok.decode(stream[s : s + L]).strip())
        lens.append(L)
    return texts, lens


def build(preset: dict, device: str, seed: int):
    import torch

    dtype = getattr(torch, preset["dtype"])
    if preset["model"] == "smollm2-135m":
        try:
            from llm2vec_fast.models import load_default_model

            model, tok = load_default_model(dtype=dtype)
            tok.padding_side = "right"
            return model.to(device), tok, "smollm2-135m-instruct"
        except (ImportError, FileNotFoundError) as e:
            print(f"[encode] real SmolLM2 unavailable ({e}); a random model of its shape instead", flush=True)
    from transformers import AutoModel

    from bench_e2e import make_config

    cfg = make_config(preset["model"], None, 0.0)
    tok = word_tokenizer(sorted(set(source_words(seed))))
    cfg.vocab_size = max(cfg.vocab_size, len(tok))
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModel.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval(), tok, preset["model"] + "-random"


def stock_encode(model, tok, texts, batch_size, device):
    """The original package's path on stock transformers (see the module docstring)."""
    import torch

    from bench_e2e import mean_pool_loop, padding_mask_4d

    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = [None] * len(texts)
    with torch.inference_mode():
        for b0 in range(0, len(order), batch_size):
            idx = order[b0 : b0 + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            h = model(input_ids=ids, attention_mask=padding_mask_4d(mask)).last_hidden_state
            e = mean_pool_loop(h, mask).float().cpu()
            for j, i in enumerate(idx):
                out[i] = e[j]
    return torch.stack(out)


def main(argv=None) -> int:
    from common import device_arg, positive_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, type=device_arg, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--preset", default=None, choices=list(PRESETS))
    ap.add_argument("--out-dir", default=None, help="where encode.jsonl goes (default benchmarks/results)")
    ap.add_argument("--n-texts", type=positive_int, default=None)
    ap.add_argument("--batch-size", type=positive_int, default=None)
    ap.add_argument("--reps", type=positive_int, default=None, help="timed reps per provider (after one warm-up)")
    ap.add_argument("--model", default=None, choices=["smollm2-135m", "llama-1b", "mistral-7b"],
                    help="override the preset's model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset_name = args.preset or ("cpu" if device == "cpu" else "gpu-quick")
    p = dict(PRESETS[preset_name])
    for k in ("n_texts", "batch_size", "reps", "model"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    if p["threads"] and device == "cpu":
        torch.set_num_threads(p["threads"])
    cuda = device.startswith("cuda")

    from llm2vec_fast import LLM2Vec, patch_model, unpatch_model

    t0 = time.time()
    model, tok, model_name = build(p, device, args.seed)
    texts, lens = make_corpus(tok, p["n_texts"], args.seed)
    enc = LLM2Vec(model, tok, pooling_mode="mean", max_length=MAX_LEN, doc_max_length=MAX_LEN)
    n_tok = sum(min(L, MAX_LEN) for L in lens)
    print(f"[encode] {model_name} on {device}: {len(texts)} texts, ~{n_tok} tokens, batch {p['batch_size']} "
          f"(set up in {time.time() - t0:.0f} s)", flush=True)

    def run_stock():
        return stock_encode(model, tok, texts, p["batch_size"], device)

    def run_ours():
        return enc.encode(texts, batch_size=p["batch_size"], show_progress_bar=False)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    providers = {"stock": run_stock, "llm2vec_fast": run_ours}
    times = {k: [] for k in providers}
    peaks = {k: 0 for k in providers}
    embs = {}
    for rep in range(p["reps"] + 1):  # rep 0 warms up (and compiles the kernels)
        for name in (list(providers) if rep % 2 == 0 else list(providers)[::-1]):
            if name == "llm2vec_fast":
                patch_model(model)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync()
            t = time.perf_counter()
            e = providers[name]()
            sync()
            dt = time.perf_counter() - t
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() - base)
            if name == "llm2vec_fast":
                unpatch_model(model)
            if rep == 0:
                embs[name] = e
            else:
                times[name].append(dt)
    cos = torch.nn.functional.cosine_similarity(embs["stock"].float(), embs["llm2vec_fast"].float(), dim=-1)
    rows = []
    for name, ts in times.items():
        s = statistics.median(ts)
        ts = sorted(ts)
        rows.append(dict(
            bench="encode", preset=preset_name, model=model_name, provider=name, n_texts=len(texts),
            batch_size=p["batch_size"], tokens=n_tok, dtype=p["dtype"], min_len=MIN_LEN, max_len=MAX_LEN,
            reps=len(ts), ms=s * 1e3, ms_p20=ts[int(0.2 * (len(ts) - 1))] * 1e3, ms_p80=ts[int(0.8 * (len(ts) - 1))] * 1e3,
            texts_per_s=len(texts) / s, tokens_per_s=n_tok / s,
            peak_mem_mb=peaks[name] / 2**20 if cuda else None,
            threads=None if cuda else torch.get_num_threads(),
            min_cos_vs_stock=float(cos.min()) if name != "stock" else None,
        ))
        print(f"[encode] {name:13s} {s * 1e3:9.1f} ms per corpus, {len(texts) / s:8.1f} texts/s, "
              f"{n_tok / s:9.0f} tokens/s" + (f", peak +{peaks[name] / 2**20:.0f} MB" if cuda else ""), flush=True)
    print(f"[encode] llm2vec_fast / stock speed-up {rows[0]['ms'] / rows[1]['ms']:.2f}x; min cosine between their "
          f"embeddings {float(cos.min()):.5f}", flush=True)
    if not args.no_save:
        from common import append_rows

        path = append_rows("encode", rows, device, args.out_dir)
        print(f"[encode] {len(rows)} rows -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

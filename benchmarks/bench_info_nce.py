"""Benchmark: pooled InfoNCE (pool + L2 normalise + similarity + cross-entropy), forward and backward.

Providers, side by side in one run on the same inputs:
  ours_triton    llm2vec_fast.pooled_info_nce(backend="triton"): Triton pooling and L2 normalisation
                 (fp32 sums, d hidden written once in the input dtype) + cuBLAS similarity + Triton softmax-CE
  ours_cuda      backend="cuda": the csrc/ pooling kernels (JIT-built before its timing) + the same loss
  eager          the PyTorch reference (llm2vec_fast.kernels.reference.pooled_info_nce_ref)
  torch_compile  torch.compile of that reference (compile time excluded: warmed up first)

Inputs are what a supervised LLM2Vec step hands the loss: bf16 hidden states (B, T, C) of
queries and positives (and with ``--neg`` one hard negative per query), padded with lengths
between 30% and 100% of T; queries carry an instruction prefix excluded from pooling (embed
mask); mean pooling, temperature 0.05. Modes: fwd, full (forward + backward to every hidden
state). Time: triton.testing.do_bench median (p20 / p80); memory: peak above the inputs during
one call (includes the returned gradients). A provider that runs out of memory gets a row with
``status="oom"``. Each row is appended as soon as it is measured to
benchmarks/results/info_nce.jsonl (``triton_speedup`` = provider ms / ours_triton ms).
gpu-full (and the cpu smoke preset) also time the loss alone (``op="info_nce"``: fp32
embeddings, B x 2B similarities, symmetric, forward + backward) for ours / eager / compile.

    python benchmarks/bench_info_nce.py --device cuda --preset gpu-quick   # ~1-2 min on an H100 (most
                                                                           # of it torch.compile's compiles)
    python benchmarks/bench_info_nce.py --device cuda --preset gpu-full    # every shape of the issue
    python benchmarks/bench_info_nce.py --device cpu --preset cpu          # tiny; Triton interpreted
"""
from __future__ import annotations

import argparse
import os
import sys

PRESETS = {
    "cpu": dict(B=[8], T=[16], C=[64], neg=[False, True], modes=["full"], providers=["ours_triton", "eager"],
                loss_B=[16]),
    "gpu-quick": dict(B=[512, 2048], T=[128], C=[4096], neg=[False, True], modes=["full"],
                      providers=["ours_triton", "torch_compile", "eager", "ours_cuda"]),
    "gpu-full": dict(B=[64, 512, 2048], T=[128, 512], C=[2048, 4096], neg=[False, True], modes=["fwd", "full"],
                     providers=["ours_triton", "torch_compile", "eager", "ours_cuda"], loss_B=[512, 2048, 4096]),
}


PROVIDERS = ("ours_triton", "ours_cuda", "eager", "torch_compile")


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import comma_list

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--preset", choices=list(PRESETS), default=None)
    p.add_argument("--out-dir", default=None, help="where info_nce.jsonl is appended (default benchmarks/results)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--providers", default=None, type=comma_list(PROVIDERS),
                   help=f"comma-separated subset of {','.join(PROVIDERS)} (default: the preset's)")
    args = p.parse_args(argv)
    preset_name = args.preset or ("gpu-quick" if args.device == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

    import torch

    if args.device == "cpu":
        # One thread: on a shared, oversubscribed CPU, OpenMP's spinning threads turned a 0.5 ms
        # eager step into 300 ms here. The row's device string records the thread count.
        torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import append_rows, bench

    import llm2vec_fast as L
    from llm2vec_fast.kernels import reference as ref

    dev = args.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if dev == "cuda" else "fp32")]
    providers = args.providers or preset["providers"]

    # Providers run in the preset's order within each case, the comparisons that matter first
    # (ours, then torch.compile): a run cut short by a timeout keeps those rows. The CUDA
    # extension is JIT-built (or loaded from torch's cache) when ours_cuda is first reached,
    # before its timing.
    cuda_state = {}

    def cuda_ready():
        if "ok" not in cuda_state:
            from llm2vec_fast.kernels import cuda as ck

            cuda_state["ok"] = dev == "cuda" and ck.cuda_ext_available()
            if not cuda_state["ok"]:
                print(f"ours_cuda skipped: {ck.cuda_ext_error() if dev == 'cuda' else 'needs --device cuda'}")
        return cuda_state["ok"]
    compiled = {}
    if "torch_compile" in providers:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    def make_inputs(B, T, C, neg):
        g = torch.Generator(device=dev).manual_seed(0)

        def part(instr):
            h = torch.randn(B, T, C, device=dev, dtype=dtype, generator=g).requires_grad_()
            lens = (torch.rand(B, device=dev, generator=g) * 0.7 + 0.3) * T
            ar = torch.arange(T, device=dev)
            mask = ar[None] < lens.long().clamp_min(1)[:, None]
            emb = (ar[None] >= instr) & mask if instr else None
            return h, mask, emb

        parts = [part(8), part(0)] + ([part(0)] if neg else [])
        return parts

    def call(fn, parts, **kw):
        (hq, mq, eq), (hd, md, ed) = parts[:2]
        hn, mn, en = parts[2] if len(parts) == 3 else (None, None, None)
        return fn(hq, mq, hd, md, embed_mask_q=eq, embed_mask_d=ed, hidden_neg=hn, mask_neg=mn, embed_mask_neg=en,
                  temperature=0.05, pooling="mean", **kw)

    def loss_fn(provider, neg):
        if provider == "ours_triton":
            return lambda parts: call(L.pooled_info_nce, parts, backend="triton")
        if provider == "ours_cuda":
            return lambda parts: call(L.pooled_info_nce, parts, backend="cuda")
        if provider == "eager":
            return lambda parts: call(ref.pooled_info_nce_ref, parts)
        if provider == "torch_compile":
            if neg not in compiled:
                compiled[neg] = torch.compile(ref.pooled_info_nce_ref)
            f = compiled[neg]
            return lambda parts: call(f, parts)
        raise ValueError(provider)

    n_rows, path = 0, None
    for C in preset["C"]:
        for T in preset["T"]:
            for B in preset["B"]:
                for neg in preset["neg"]:
                    parts = make_inputs(B, T, C, neg)
                    hs = [x[0] for x in parts]
                    rows = []
                    for provider in providers:
                        if provider == "ours_cuda" and not cuda_ready():
                            continue
                        f = loss_fn(provider, neg)
                        for mode in preset["modes"]:
                            if mode == "fwd":
                                def run():
                                    with torch.no_grad():
                                        return f(parts)
                            else:
                                def run():
                                    loss = f(parts)
                                    return torch.autograd.grad(loss, hs)
                            row = dict(op="pooled_info_nce", provider=provider, mode=mode, B=B, T=T, C=C,
                                       M=B if neg else 0, dtype=str(dtype).replace("torch.", ""), pooling="mean",
                                       preset=preset_name)
                            try:
                                run()  # warm-up: Triton / inductor compilation, cuBLAS handles
                                row.update(bench(run, dev), status="ok")
                            except torch.OutOfMemoryError:
                                row.update(status="oom")
                            except Exception as e:  # a failing provider is a row, not a crash
                                row.update(status=f"error: {type(e).__name__}: {str(e)[:300]}")
                            if dev == "cuda":
                                torch.cuda.empty_cache()
                            o = [x for x in rows if x["provider"] == "ours_triton" and x["mode"] == mode and x.get("ms")]
                            if o and row.get("ms") and provider != "ours_triton":
                                row["triton_speedup"] = row["ms"] / o[0]["ms"]  # above 1: ours is faster
                            rows.append(row)
                            # One row at a time: a run cut short by a timeout keeps what it measured.
                            path = append_rows("info_nce", [row], dev, args.out_dir)
                            n_rows += 1
                            ms = f"{row['ms']:.3f} ms" if row.get("ms") is not None else row["status"]
                            mem = f", {row['peak_mem_mb']:.0f} MB" if row.get("peak_mem_mb") is not None else ""
                            sp = f", ours_triton {row['triton_speedup']:.2f}x faster" if "triton_speedup" in row else ""
                            print(f"B={B} T={T} C={C} neg={neg} {mode:4s} {provider:14s} {ms}{mem}{sp}", flush=True)
                    del parts, hs
                    if dev == "cuda":
                        torch.cuda.empty_cache()
    # gpu-full: the loss alone on fp32 embeddings (similarity + temperature + CE, forward and
    # backward), to show what the cuBLAS-matmul + Triton-CE split costs next to the pooling.
    for B in preset.get("loss_B", []):
        C = 4096 if dev == "cuda" else 64
        embs = [torch.randn(n, C, device=dev, requires_grad=True) for n in (B, B, B)]
        eager_loss = lambda q, d, n: ref.info_nce_ref(q, d, n, temperature=0.05, symmetric=True)  # noqa: E731
        fns = {"ours_triton": lambda q, d, n: L.info_nce(q, d, n, temperature=0.05, symmetric=True, backend="triton"),
               "eager": eager_loss}
        if "torch_compile" in providers:
            fns["torch_compile"] = torch.compile(eager_loss)
        ours_ms = None
        for provider, f in fns.items():
            def run():
                return torch.autograd.grad(f(*embs), embs)
            row = dict(op="info_nce", provider=provider, mode="full", B=B, C=C, M=B, dtype="float32",
                       symmetric=True, preset=preset_name)
            try:
                run()
                row.update(bench(run, dev), status="ok")
            except torch.OutOfMemoryError:
                row.update(status="oom")
            if provider == "ours_triton":
                ours_ms = row.get("ms")
            elif ours_ms and row.get("ms"):
                row["triton_speedup"] = row["ms"] / ours_ms
            path = append_rows("info_nce", [row], dev, args.out_dir)
            n_rows += 1
            print(f"loss only B={B} N={2 * B} C={C} {provider:14s} {row.get('ms', row['status'])}", flush=True)
    print(f"{n_rows} rows appended to {path if n_rows else '(nothing)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

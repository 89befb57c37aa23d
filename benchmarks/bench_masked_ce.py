"""Benchmark: masked next-token cross-entropy fused with the LM head (the MNTP loss).

Providers, side by side in one run on the same inputs:
  ours          llm2vec_fast.masked_linear_cross_entropy(backend="triton"), strategy "auto"
  ours-count    the same given the labelled-row count (``num_labelled``, counted once per case
                on the host, as the MNTP collator hands it to the trainer's loss): no host sync
  strategy-eager, strategy-two_pass
                the same with the strategy forced (gradients made in the forward from
                materialised chunks of logits, or the logits recomputed in the backward);
                named as peers so the summary shows what auto's choice gained or lost
  strategy-two_pass-triton-fwd
                two-pass with its Triton forward kernel instead of the cuBLAS-chunk
                forward it runs with d weight (GEMM_FORWARD off), a peer
  strategy-eager-chunked
                eager with d weight accumulated chunk by chunk (EAGER_STORED off) instead
                of made once from the stored dz, a peer
  ref_chunked   the chunked PyTorch reference (backend="torch")
  ours_torch, torch-two_pass
                the reference as our CPU path runs it (backend="torch", strategy "auto",
                eager there) and with the two-pass strategy forced (a peer)   [cpu-smollm]
  torch_full    full logits (hidden @ W.T in the input dtype, upcast to fp32) + F.cross_entropy,
                what stock transformers does
  torch_compile torch.compile of the chunked reference                      [gpu-full]
  liger         Liger-Kernel's fused linear cross-entropy (when importable)
  cce           cut-cross-entropy's linear_cross_entropy (when importable) on the shifted rows
                flattened, as a generic causal-LM head calls a loss
  cce-shift     the same with its own shift (``shift=True`` on (B, T, C)): no copy of the
                shifted hidden states, its lowest-memory call
Liger and ``cce`` get the shifted rows flattened, all of them (ignored ones included), which
is how a causal-LM head calls them (flattening hidden[:, :-1] copies it, and its backward
pads a second full-size gradient); ours, the reference and ``cce-shift`` take (B, T, C)
with the shift inside (ours gathers the labelled rows by index). Case ``w_grad``: with d weight (a trained LM
head) or without (frozen head, the LoRA MNTP recipe); every provider gets the same.

Modes: fwd (forward that builds the graph), bwd (backward alone, graph retained), full.
Compare strategies on ``full`` only: the eager strategy does its gradient work in the
forward, and a retained graph's repeated backward recomputes (two-pass), so its fwd / bwd
rows do not split the same work as the two-pass ones.
Time from triton.testing.do_bench medians (p20 / p80 too); peak memory is
max_memory_allocated during one call above what was allocated before it (the inputs), so it
includes the gradients each provider returns. On CUDA, our rows also carry ``kernel_ms``:
the device time per call of the ten most expensive kernels (torch.profiler) and of all of
them (``(all kernels)``: the rest of ``ms`` is the device waiting on the host), so a row says
where the time went, and ``device_gaps``: within a call started on an idle device, the idle
time and its longest gaps, each named by the device activities around it (the wait for the
labelled-row count's host sync shows as a gap after the nonzero's copy). Rows go to
benchmarks/results/masked_ce.jsonl.

    python benchmarks/bench_masked_ce.py --device cuda --preset gpu-quick
    python benchmarks/bench_masked_ce.py --device cpu --preset cpu   # Triton interpreted
    python benchmarks/bench_masked_ce.py --device cpu --preset cpu-smollm   # our CPU path (torch backend)
    python benchmarks/bench_masked_ce.py --device cpu --preset smoke   # every provider's plumbing, tiny
    python benchmarks/bench_masked_ce.py --providers strategy-eager,cce --eager-chunk-mb 128   # a bigger chunk
"""
from __future__ import annotations

import argparse
import os
import sys

PRESETS = {
    # tiny, under a minute on 2 CPU cores; ours runs under the Triton interpreter
    "cpu": dict(C=[64], V=[1000, 4000], tokens=[512], frac=[0.2], modes=["full"], w_grad=[True, False],
                providers=["ours", "ours-count", "strategy-eager", "strategy-two_pass", "ref_chunked", "torch_full"]),
    # every provider's plumbing on one tiny case (tests/test_bench.py; ours interpreted on a CPU):
    # not a measurement
    "smoke": dict(C=[64], V=[1000], tokens=[256], frac=[0.2], modes=["fwd", "bwd", "full"], w_grad=[True, False],
                  providers=["ours", "ours-count", "strategy-eager", "strategy-eager-chunked", "strategy-two_pass",
                             "strategy-two_pass-triton-fwd", "ref_chunked", "torch_full", "liger", "cce", "cce-shift"],
                  seq=64, rep=1),
    # our CPU path (the torch backend) at the CPU end-to-end MNTP step's LM head: SmolLM2-135M
    # (C = 576, V = 49152), 8 x 128 tokens, 20% labelled, fp32; ~1 min on 2 cores
    "cpu-smollm": dict(C=[576], V=[49152], tokens=[1024], frac=[0.2], modes=["full"], w_grad=[False, True],
                       providers=["ours_torch", "torch-two_pass", "torch_full"], dtype="fp32", seq=128, rep=7),
    # the acceptance shapes, with a trained and a frozen LM head (~60 s on an H200 for the first
    # two vocabularies; V = 151936 last, so a run cut by gpu_check.sh's limit keeps the others)
    "gpu-quick": dict(C=[4096], V=[32000, 128256, 151936], tokens=[16384], frac=[0.2], modes=["full"], w_grad=[True, False],
                      providers=["ours", "ours-count", "strategy-eager", "strategy-eager-chunked", "strategy-two_pass",
                                 "strategy-two_pass-triton-fwd", "torch_full", "liger", "cce", "cce-shift"]),
    "gpu-full": dict(C=[4096], V=[32000, 128256, 151936], tokens=[4096, 16384, 32768], frac=[0.15, 0.2, 0.5, 1.0],
                     modes=["fwd", "bwd", "full"], w_grad=[True, False],
                     providers=["ours", "ours-count", "strategy-eager", "strategy-eager-chunked", "strategy-two_pass",
                                "strategy-two_pass-triton-fwd", "ref_chunked", "torch_full",
                                "torch_compile", "liger", "cce", "cce-shift"]),
}
SEQ = 512  # tokens per sequence (the MNTP recipe's chunk length)
# Providers that force a strategy with one switch of kernels.triton.masked_ce off (read in the
# forward, which decides how the gradients are made).
FLAG_OFF = {
    "strategy-two_pass-triton-fwd": ("two_pass", "GEMM_FORWARD"),
    "strategy-eager-chunked": ("eager", "EAGER_STORED"),
}
# every provider make_fn knows: those of the presets
PROVIDERS = tuple(dict.fromkeys(x for preset in PRESETS.values() for x in preset["providers"]))


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import comma_list

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--preset", choices=list(PRESETS), default=None)
    p.add_argument("--out-dir", default=None, help="where masked_ce.jsonl is appended (default benchmarks/results)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--eager-chunk-mb", type=int, default=None,
                   help="the eager strategy's fp32 logits chunk in MiB (default: the module's EAGER_CHUNK_ELEMS, "
                        "64 MiB); rows record it as eager_chunk_mib (a case of its own in the summary), to weigh speed against peak memory")
    p.add_argument("--providers", default=None, type=comma_list(PROVIDERS),
                   help=f"comma-separated subset of {','.join(PROVIDERS)} (default: the preset's)")
    args = p.parse_args(argv)
    preset = args.preset or ("gpu-quick" if args.device == "cuda" else "cpu")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import append_rows, bench, kernel_times_and_gaps

    import llm2vec_fast as L
    from llm2vec_fast.kernels import reference as ref

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or PRESETS[preset].get("dtype") or ("bf16" if args.device == "cuda" else "fp16")
    ]
    cfg = dict(PRESETS[preset])
    if args.providers:
        cfg["providers"] = args.providers
    seq = cfg.get("seq", SEQ)
    chunk_mb = None
    if args.eager_chunk_mb is not None:
        if args.eager_chunk_mb < 1:
            p.error(f"--eager-chunk-mb: expected a whole number of MiB >= 1, got {args.eager_chunk_mb}")
        from llm2vec_fast.kernels.triton import masked_ce as mce_mod

        mce_mod.EAGER_CHUNK_ELEMS = args.eager_chunk_mb * 2**20 // 4
        chunk_mb = args.eager_chunk_mb

    liger = cce = None
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
    except Exception as e:  # not installed / incompatible: no row
        print(f"liger unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except Exception as e:
        print(f"cut-cross-entropy unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    compiled_ref = None

    def shifted_rows(h, y):
        return h[:, :-1].reshape(-1, h.shape[-1]), y[:, 1:].reshape(-1)

    def make_fn(name):
        nonlocal compiled_ref
        if name == "ours":
            return lambda h, w, y: L.masked_linear_cross_entropy(h, w, y, backend="triton")
        if name == "ours-count":  # n_lab: this case's count, set before its providers run
            return lambda h, w, y: L.masked_linear_cross_entropy(h, w, y, backend="triton", num_labelled=n_lab)
        if name in FLAG_OFF:  # a strategy forced with one of its module switches off
            from llm2vec_fast.kernels.triton import masked_ce as mce

            strategy, flag = FLAG_OFF[name]

            def switched_off(h, w, y):
                was = getattr(mce, flag)
                setattr(mce, flag, False)
                try:
                    return L.masked_linear_cross_entropy(h, w, y, backend="triton", strategy=strategy)
                finally:
                    setattr(mce, flag, was)
            return switched_off
        if name.startswith("strategy-"):
            strategy = name.split("-", 1)[1]
            return lambda h, w, y: L.masked_linear_cross_entropy(h, w, y, backend="triton", strategy=strategy)
        if name in ("ref_chunked", "ours_torch"):
            return lambda h, w, y: L.masked_linear_cross_entropy(h, w, y, backend="torch")
        if name == "torch-two_pass":
            return lambda h, w, y: L.masked_linear_cross_entropy(h, w, y, backend="torch", strategy="two_pass")
        if name == "torch_full":
            def full(h, w, y):
                z = (h @ w.t()).float()
                return F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), y[:, 1:].reshape(-1), ignore_index=-100)
            return full
        if name == "torch_compile":
            if compiled_ref is None:
                compiled_ref = torch.compile(ref.masked_linear_cross_entropy_ref)
            return lambda h, w, y: compiled_ref(h, w, y)
        if name == "liger":
            if liger is None:
                return None

            def lg(h, w, y):
                out = liger(w, *shifted_rows(h, y))
                return out if torch.is_tensor(out) else out[0]
            return lg
        if name == "cce":
            if cce is None or args.device != "cuda":
                return None
            def cc(h, w, y):
                hf, yf = shifted_rows(h, y)
                return cce(hf, w, yf)
            return cc
        if name == "cce-shift":
            if cce is None or args.device != "cuda":
                return None
            return lambda h, w, y: cce(h, w, y, shift=True)
        raise ValueError(name)

    rows, n_saved, path = [], 0, None
    cases = [(C, V, T, frac, wg) for C in cfg["C"] for V in cfg["V"] for T in cfg["tokens"] for frac in cfg["frac"]
             for wg in cfg.get("w_grad", [True])]
    for C, V, T, frac, w_grad in cases:
        g = torch.Generator(device=dev).manual_seed(0)
        B = max(1, T // seq)
        hidden = torch.randn(B, T // B, C, device=dev, dtype=dtype, generator=g).requires_grad_()
        # w_grad=False: a frozen LM head, as the LoRA MNTP recipe trains (no d weight)
        weight = (torch.randn(V, C, device=dev, dtype=dtype, generator=g) / C**0.5).requires_grad_(w_grad)
        labels = torch.randint(0, V, (B, T // B), device=dev, generator=g)
        labels[torch.rand(labels.shape, device=dev, generator=g) >= frac] = -100
        n_lab = int((labels[:, 1:] != -100).sum())
        for prov in cfg["providers"]:
            fn = make_fn(prov)
            if fn is None:
                continue
            params = [hidden, weight] if w_grad else [hidden]
            for mode in cfg["modes"]:
                row = dict(op="masked_linear_cross_entropy", provider=prov, mode=mode, dtype=str(dtype).split(".")[-1],
                           C=C, V=V, tokens=T, labelled_frac=frac, n_labelled=n_lab, preset=preset,
                           w_grad=w_grad)
                if chunk_mb is not None:
                    row["eager_chunk_mib"] = chunk_mb
                try:
                    if mode == "fwd":
                        run = lambda: fn(hidden, weight, labels)  # noqa: E731
                    elif mode == "full":
                        run = lambda: torch.autograd.grad(fn(hidden, weight, labels), params)  # noqa: E731
                    else:
                        loss = fn(hidden, weight, labels)
                        run = lambda: torch.autograd.grad(loss, params, retain_graph=True)  # noqa: E731
                    tk = sys.modules.get("llm2vec_fast.kernels.triton.masked_ce")
                    if tk is not None:
                        tk.LAST_TILES.clear()
                    run()  # warm-up: autotuning, compilation
                    row.update(bench(run, args.device, **({} if args.device == "cuda" else dict(warmup=1, rep=cfg.get("rep", 3)))))
                    tk = sys.modules.get("llm2vec_fast.kernels.triton.masked_ce")
                    if args.device == "cuda" and tk is not None and tk.LAST_TILES:
                        row["tiles"] = dict(tk.LAST_TILES)  # the autotuners' picks
                    if args.device == "cuda" and (prov in ("ours", "ours-count") or prov.startswith("strategy-")):
                        # where our time goes (GEMMs, row kernel, copies) and where the device
                        # waits on the host, and for what: one profiler session
                        row["kernel_ms"], row["device_gaps"] = kernel_times_and_gaps(run)
                        # how the two-pass d-hidden accumulation ran: one in-place GEMM, or mm + add
                        row.setdefault("tiles", {})["dh_accumulate"] = (
                            "addmm-inplace" if tk._addmm_into_fp32_ok(hidden) else "mm+add")
                except Exception as e:  # an OOM or a provider failure is a result too
                    row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
                finally:
                    run = loss = None
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                ms = row.get("ms")
                mem = row.get("peak_mem_mb")
                print(f"{prov:17s} {mode:4s} C={C} V={V} T={T} frac={frac} w_grad={w_grad}: "
                      + (f"{ms:9.3f} ms" if ms is not None else row.get("error", "?"))
                      + (f"  peak {mem:9.1f} MiB" if mem is not None else ""), flush=True)
        del hidden, weight, labels
        # per case, so a run stopped by a time limit (gpu_check.sh) keeps what it measured
        path = append_rows("masked_ce", rows[n_saved:], args.device, out_dir=args.out_dir)
        n_saved = len(rows)
    print(f"{len(rows)} rows -> {path if rows else '(nothing)'}")
    if not rows:
        print("no rows: every selected provider was unsupported on every case (see above)", file=sys.stderr)
    return 0 if rows else 1  # a run that measured nothing is not a success (gpu_check.sh reads this)


if __name__ == "__main__":
    sys.exit(main())

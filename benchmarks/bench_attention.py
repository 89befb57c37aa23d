"""Non-causal attention benchmark: ours (Triton) against what users would pick instead.

Providers (each only where it accepts the case):
  ours          llm2vec_fast.flash_attn_noncausal(backend="triton") on (B, S, H, D), mask read by the kernel;
                on padded cases the mask goes through hf.padding.padding_info first, as in a patched
                model, which notes a left / right padded mask hole-free (the forward without its
                loop copy for holes)
  ours-holes    the same call with a copy of the mask that nobody noted: the general forward (padded cases)
  ours-gridorder  ours with the kernels' programs taking the sequences in batch order instead of
                longest first (attention.LONGEST_FIRST off; padded cases)
  ours-varlen   flash_attn_varlen_noncausal(backend="triton") on the unpadded tokens (padded cases)
  ours-atomic   ours with the atomic backward (LLM2VEC_FAST_ATTN_BWD=atomic: one dK/dV kernel that
                also accumulates dQ), bwd / full modes, where it has GPU tiles (16-bit, head dim 64-128)
  ours-notma    ours with the pointer tiles only (LLM2VEC_FAST_ATTN_TMA=0), beside ours whose
                autotuner also weighs the TMA tiles (D = 128 cases from S = 2048 on)
  reference     the fp32 pure-PyTorch reference (small shapes only: it materialises B*H*S*S scores)
  sdpa-flash / sdpa-efficient / sdpa-cudnn / sdpa-math
                F.scaled_dot_product_attention pinned to one backend (unpadded: no mask;
                padded: boolean key mask, which flash and cuDNN refuse)
  hf-sdpa       what stock transformers does with a padded batch: its sdpa_attention_forward
                (K/V repeated for GQA, SDPA with the materialised (B, 1, S, S) boolean mask its
                create_bidirectional_mask builds, SDPA picks the backend, output made
                (B, S, H, D)-contiguous), fed the (B, H, S, D) views a layer passes
  flex          FlexAttention (torch.compile'd) with a padding block mask
  flash-attn    flash_attn_func / flash_attn_varlen_func when importable

Modes: fwd (no grad), bwd (backward of a retained graph), full (forward + backward); gradients
through torch.autograd.grad (no accumulation into .grad).
TFLOP/s counts valid tokens only: forward 4 * sum(s_i^2) * H * D, backward 2.5x, full 3.5x.
Rows go to benchmarks/results/attention.jsonl with device, versions and git sha.

    python benchmarks/bench_attention.py --device cuda --preset gpu-quick
    python benchmarks/bench_attention.py --device cpu --preset cpu     # the reference and SDPA math
    python benchmarks/bench_attention.py --device cpu --preset smoke --dtype fp16   # every provider's
                                          # plumbing on one tiny batch, ours interpreted (not timings)
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_rows, bench, comma_list, kernel_times_and_gaps  # noqa: E402

# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------


def _case(name, B, S, H, Hkv, D, lengths=None):
    return dict(name=name, B=B, S=S, H=H, Hkv=Hkv, D=D, lengths=lengths)


def _padded_lengths(B, S, gen):
    # LLM2Vec-like batches: lengths uniform in [0.3, 1] x S_max, the longest exactly S_max.
    lens = (torch.rand(B, generator=gen) * 0.7 + 0.3) * S
    lens = lens.long().clamp(1, S)
    lens[0] = S
    return lens.tolist()


def cases_for(preset: str):
    gen = torch.Generator().manual_seed(0)
    if preset == "smoke":
        # one tiny padded GQA batch on which every provider's plumbing runs (tests/test_bench.py;
        # on a CPU ours runs interpreted): not a measurement
        return [_case("padded", 3, 40, 4, 2, 64, [40, 23, 9])]
    if preset == "cpu":
        return [
            _case("unpadded", 2, 128, 4, 4, 64),
            _case("padded", 4, 128, 4, 4, 64, _padded_lengths(4, 128, gen)),
            _case("gqa", 2, 128, 8, 2, 64),
        ]
    if preset == "gpu-quick":
        # The targets' cases first (D = 128 at S = 4k, the padded batch, D = 128 at S = 8k), so
        # a run cut by its time limit (gpu_check.sh; each new case autotunes its kernels) still
        # has them; the padded case's diagnostic providers (ours-holes, ours-gridorder) made the
        # whole list outgrow the limit on paper.
        return [
            _case("unpadded", 4, 4096, 32, 32, 128),
            _case("padded", 16, 2048, 32, 8, 128, _padded_lengths(16, 2048, gen)),
            _case("unpadded", 2, 8192, 32, 32, 128),
            _case("unpadded", 4, 4096, 32, 32, 64),
            _case("gqa", 4, 4096, 32, 8, 128),
            _case("unpadded", 2, 8192, 32, 32, 64),
            # SmolLM2-135M's attention (9 / 3 heads, D = 64) on a batch of 32 short texts (STS-B
            # sentences, 30-100% of 64 tokens): microseconds of device work per call, so the
            # host's cost per call (argument checks, launches) is what the rows time, ours
            # against SDPA's and Flex's
            _case("padded", 32, 64, 9, 3, 64, _padded_lengths(32, 64, gen)),
        ]
    out = []
    for D in (128, 64):
        for S in (512, 1024, 2048, 4096, 8192, 16384):
            out.append(_case("unpadded", max(1, 16384 // S), S, 32, 32, D))
    for S in (512, 2048, 4096):
        B = max(2, 32768 // S)
        out.append(_case("padded", B, S, 32, 8, 128, _padded_lengths(B, S, gen)))
        out.append(_case("padded", B, S, 32, 32, 64, _padded_lengths(B, S, gen)))
    for S in (2048, 8192):
        out.append(_case("gqa", max(1, 16384 // S), S, 32, 8, 128))
    return out


MODES = ("fwd", "bwd", "full")
# every provider make_provider knows (see the module docstring)
PROVIDERS = ("ours", "ours-atomic", "ours-notma", "ours-holes", "ours-gridorder", "ours-varlen", "reference", "sdpa-flash",
             "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "hf-sdpa", "flex", "flash-attn")


def default_providers(case, device: str, preset: str = ""):
    if device == "cpu" and preset != "smoke":
        return ["reference", "sdpa-math"]
    p = ["ours"]
    if case["D"] in (64, 128):
        p += ["ours-atomic"]
    if case["D"] == 128 and case["S"] >= 2048 and case["name"] != "gqa":
        p += ["ours-notma"]  # the TMA tiles' gain, side by side
    if case["lengths"] is not None:
        p += ["ours-holes", "ours-gridorder", "ours-varlen", "hf-sdpa", "sdpa-efficient", "flex"]
    else:
        p += ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient"]
        if case["name"] == "gqa":
            p += ["hf-sdpa"]
    p += ["flash-attn", "reference"]
    return p


# --------------------------------------------------------------------------------------
# Providers: each returns a closure computing the output (B, S, H, D) or (T, H, D)
# --------------------------------------------------------------------------------------


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend

    return {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-math": SDPBackend.MATH,
    }[name]


def _with_leaves(fn, leaves):
    """``fn``, marked with the tensors its backward differentiates (default: the case's q, k, v)."""
    fn.leaves = leaves
    return fn


def make_provider(name, case, q, k, v, mask, cu, unpad_idx):
    """A closure computing attention for ``case`` with provider ``name`` (None: not applicable)."""
    B, S, H, Hkv, D = case["B"], case["S"], case["H"], case["Hkv"], case["D"]
    scale = 1.0 / math.sqrt(D)
    padded = case["lengths"] is not None
    if name in ("ours", "ours-atomic", "ours-notma", "ours-holes", "ours-gridorder"):  # run_one sets their switches
        from llm2vec_fast.hf.padding import padding_info
        from llm2vec_fast.ops.attention import flash_attn_noncausal

        if name in ("ours-holes", "ours-gridorder") and mask is None:
            return None
        if name == "ours-holes":
            general = mask.clone()  # a mask object nobody checked for holes
            return lambda: flash_attn_noncausal(q, k, v, general, backend="triton")
        if mask is not None:
            padding_info(mask)  # what a patched model does once per forward (one host sync, outside the timing)
        return lambda: flash_attn_noncausal(q, k, v, mask, backend="triton")
    if name == "ours-varlen":
        from llm2vec_fast.ops.attention import flash_attn_varlen_noncausal

        if not padded:
            return None
        qu, ku, vu = (t.reshape(B * S, -1, D)[unpad_idx].detach().requires_grad_(t.requires_grad) for t in (q, k, v))
        mx = max(case["lengths"])
        return _with_leaves(
            lambda: flash_attn_varlen_noncausal(qu, ku, vu, cu, cu, mx, mx, backend="triton", _check_values=False),
            (qu, ku, vu),
        )
    if name == "reference":
        from llm2vec_fast.kernels.reference import attention_padded_ref

        if q.is_cuda and B * H * S * S * 4 * 3 > 6 * 2**30:
            return None
        return lambda: attention_padded_ref(q, k, v, mask, scale, upcast=True)
    if name.startswith("sdpa-"):
        from torch.nn.attention import sdpa_kernel

        be = _sdpa_backend(name)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        attn_mask = None if mask is None else mask[:, None, None, :]
        if name == "sdpa-math" and q.is_cuda and B * H * S * S * 2 * 3 > 6 * 2**30:
            return None

        def f():
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, scale=scale, enable_gqa=H != Hkv)

        return f
    if name == "hf-sdpa":
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        # The (B, 1, S, S) boolean mask transformers' create_bidirectional_mask builds for SDPA
        # (materialised, made once per forward for all layers: outside the timing).
        attn_mask = None if mask is None else mask[:, None, None, :].expand(B, 1, S, S).contiguous()
        try:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
        except ImportError:
            sdpa_attention_forward = None
        if sdpa_attention_forward is not None:
            # transformers' own attention function: K/V repeated for GQA (repeat_kv) when a mask
            # is given, SDPA, and the output made (B, S, H, D)-contiguous, as a layer runs it
            layer = torch.nn.Module()  # what the function reads of an attention layer
            layer.num_key_value_groups, layer.is_causal = H // Hkv, False
            return lambda: sdpa_attention_forward(layer, qt, kt, vt, attn_mask, dropout=0.0, scaling=scale,
                                                  is_causal=False)[0]

        def f():
            kr = kt.repeat_interleave(H // Hkv, dim=1) if H != Hkv else kt
            vr = vt.repeat_interleave(H // Hkv, dim=1) if H != Hkv else vt
            out = F.scaled_dot_product_attention(qt, kr, vr, attn_mask=attn_mask, scale=scale)
            return out.transpose(1, 2).contiguous()

        return f
    if name == "flex":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:
            return None
        if not q.is_cuda:
            return None
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        block_mask = None
        if mask is not None:
            lens = mask.sum(1).to(torch.int32)

            def pad_mod(b, h, q_idx, kv_idx):
                return (kv_idx < lens[b]) & (q_idx < lens[b])

            block_mask = create_block_mask(pad_mod, B, None, S, S, device=q.device)
        # A fresh compile per case: torch.compile recompiles flex_attention for every shape
        # (dynamic=False), and past dynamo's recompile limit (8) it silently ran the eager,
        # unfused path (28 Nov, git 69fcae8: 20-130x slower rows from the fifth case on).
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda: flex(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=H != Hkv)
    if name == "flash-attn":
        try:
            from flash_attn import flash_attn_func, flash_attn_varlen_func
        except ImportError:
            return None
        if padded:
            qu, ku, vu = (t.reshape(B * S, -1, D)[unpad_idx].detach().requires_grad_(t.requires_grad) for t in (q, k, v))
            mx = max(case["lengths"])
            return _with_leaves(
                lambda: flash_attn_varlen_func(qu, ku, vu, cu, cu, mx, mx, softmax_scale=scale, causal=False),
                (qu, ku, vu),
            )
        return lambda: flash_attn_func(q, k, v, softmax_scale=scale, causal=False)
    raise ValueError(f"unknown provider {name}")


# --------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------


def _inputs(case, device, dtype, requires_grad):
    B, S, H, Hkv, D = case["B"], case["S"], case["H"], case["Hkv"], case["D"]
    q = torch.randn(B, S, H, D, device=device, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(B, S, Hkv, D, device=device, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, S, Hkv, D, device=device, dtype=dtype, requires_grad=requires_grad)
    mask = cu = idx = None
    if case["lengths"] is not None:
        lens = torch.tensor(case["lengths"], device=device)
        mask = torch.arange(S, device=device)[None, :] < lens[:, None]
        cu = torch.zeros(B + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lens, 0).to(torch.int32)
        idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
    return q, k, v, mask, cu, idx


def valid_flops(case, mode):
    lens = case["lengths"] or [case["S"]] * case["B"]
    f = 4.0 * sum(s * s for s in lens) * case["H"] * case["D"]
    return f * {"fwd": 1.0, "bwd": 2.5, "full": 3.5}[mode]


def run_one(provider, case, mode, device, dtype):
    if provider == "ours-gridorder":
        from llm2vec_fast.kernels.triton import attention as tk

        tk.LONGEST_FIRST = False  # forward and backward, timing and warm-up
        try:
            return _run_one(provider, case, mode, device, dtype)
        finally:
            tk.LONGEST_FIRST = True
    if provider.endswith("-atomic"):
        if mode == "fwd":
            return None  # the same forward as without "-atomic"
        with _env("LLM2VEC_FAST_ATTN_BWD", "atomic"):
            r = _run_one(provider, case, mode, device, dtype)
        if r is not None and "dkdv_atomic" not in r.get("tiles", {}):
            raise RuntimeError("the atomic backward did not run for this case (no GPU tiles)")
        return r
    if provider == "ours-notma":
        with _env("LLM2VEC_FAST_ATTN_TMA", "0"):
            r = _run_one(provider, case, mode, device, dtype)
        if r is not None and any("tma" in t for t in r.get("tiles", {}).values()):
            raise RuntimeError(f"a TMA tile ran with LLM2VEC_FAST_ATTN_TMA=0: {r['tiles']}")
        return r
    return _run_one(provider, case, mode, device, dtype)


@contextlib.contextmanager
def _env(name: str, value: str):
    """The environment variable ``name`` set to ``value`` inside the block, restored after."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name)
        else:
            os.environ[name] = old


def _run_one(provider, case, mode, device, dtype):
    q, k, v, mask, cu, idx = _inputs(case, device, dtype, requires_grad=mode != "fwd")
    fn = make_provider(provider, case, q, k, v, mask, cu, idx)
    if fn is None:
        return None
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn()
    # Gradients through torch.autograd.grad, never into .grad: accumulating into the leaves'
    # .grad fields (out.backward) added one elementwise pass over q, k and v per call, a
    # cost no training step has (there the gradients flow into the projections' backward):
    # 0.28 ms of the padded batch's 3.99 ms backward on the H200 (git c3c84b9, kernel_ms).
    leaves = getattr(fn, "leaves", (q, k, v))
    if mode == "bwd":
        out = fn()
        do = torch.randn_like(out)

        def step():
            torch.autograd.grad(out, leaves, do, retain_graph=True)
    elif mode == "full":
        do = None

        def step():
            nonlocal do
            out = fn()
            if do is None:
                do = torch.randn_like(out)
            torch.autograd.grad(out, leaves, do)
    tk = sys.modules.get("llm2vec_fast.kernels.triton.attention")
    if tk is not None:
        tk.LAST_TILES.clear()
    step()  # compile / autotune outside the timing
    r = bench(step, device)
    r["tflops"] = valid_flops(case, mode) / (r["ms"] * 1e-3) / 1e12
    tk = sys.modules.get("llm2vec_fast.kernels.triton.attention")  # imported by the first call if not before
    if provider.startswith("ours") and tk is not None and tk.LAST_TILES:
        r["tiles"] = dict(tk.LAST_TILES)  # what the autotuner (or the heuristic) launched
    if provider.startswith("ours") and str(device).startswith("cuda"):
        # kernel_ms (backward rows): where the backward's time goes, dQ vs dK/dV kernels, the
        # delta pass, the atomic backward's accumulator memset and cast; device_gaps: the
        # device waiting on the host within a call. One profiler session for both.
        kms, r["device_gaps"] = kernel_times_and_gaps(step, iters=3, top=6)
        if mode == "bwd":
            r["kernel_ms"] = kms
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=["cpu", "smoke", "gpu-quick", "gpu-full"], default=None)
    ap.add_argument("--modes", default=list(MODES), type=comma_list(MODES), help="comma-separated subset of fwd,bwd,full")
    ap.add_argument("--providers", default=None, type=comma_list(PROVIDERS),
                    help=f"comma-separated subset of {','.join(PROVIDERS)}; default: every applicable one")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    ap.add_argument("--out-dir", default=None, help="where attention.jsonl is appended (default benchmarks/results)")
    args = ap.parse_args(argv)
    preset = args.preset or ("cpu" if args.device == "cpu" else "gpu-quick")
    if args.device == "cpu":  # our providers run under Triton's interpreter (set before triton is imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    ]
    modes = args.modes
    # SDPA explains at length why a pinned backend refuses a case; the table says it once.
    warnings.filterwarnings("ignore", message=".*(kernel not used|runtime disabled|fused kernels require).*")
    rows, n_saved, path = [], 0, None
    t0 = time.time()
    print(f"{'case':9s} {'B':>3s} {'S':>6s} {'H/Hkv':>6s} {'D':>4s} {'mode':5s} {'provider':15s} {'ms':>9s} {'TFLOP/s':>8s} {'MB':>8s}")
    for case in cases_for(preset):
        provs = args.providers or default_providers(case, args.device, preset)
        for mode in modes:
            for p in provs:
                try:
                    r = run_one(p, case, mode, args.device, dtype)
                except Exception as e:  # a provider that rejects the case is reported, not fatal
                    msg = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
                    print(f"{case['name']:9s} {case['B']:3d} {case['S']:6d} {case['H']:>3d}/{case['Hkv']:<2d} {case['D']:4d} {mode:5s} {p:15s} unsupported: {msg}")
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if r is None:
                    continue
                mem = r["peak_mem_mb"]
                print(f"{case['name']:9s} {case['B']:3d} {case['S']:6d} {case['H']:>3d}/{case['Hkv']:<2d} {case['D']:4d} {mode:5s} {p:15s} {r['ms']:9.3f} {r['tflops']:8.1f} {'-' if mem is None else str(round(mem)):>8}")
                rows.append(dict(
                    bench="attention", preset=preset, case=case["name"], B=case["B"], S=case["S"], H=case["H"],
                    Hkv=case["Hkv"], D=case["D"], valid_tokens=sum(case["lengths"] or [case["S"]] * case["B"]),
                    dtype=str(dtype).replace("torch.", ""), mode=mode, provider=p, **r,
                ))
                if args.device == "cuda":
                    torch.cuda.empty_cache()
        # per case, so a run stopped by a time limit (gpu_check.sh) keeps what it measured
        path = append_rows("attention", rows[n_saved:], args.device, args.out_dir)
        n_saved = len(rows)
    print(f"{len(rows)} rows -> {path if rows else '(nothing)'} ({time.time() - t0:.0f} s)")
    if not rows:
        print("no rows: every selected provider was unsupported on every case (see above)", file=sys.stderr)
    return 0 if rows else 1  # a run that measured nothing is not a success (gpu_check.sh reads this)


if __name__ == "__main__":
    sys.exit(main())

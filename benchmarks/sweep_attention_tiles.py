"""Time each attention kernel at fixed tiles, one kernel kind at a time (GPU only).

The autotuner only reports its winner; this script says how far apart the candidates are,
so a tile list can be chosen (and a spill-free tile weighed against a faster one that
spills) from measurements. For each kind it replaces that kind's tile list by one tile,
with autotuning off (``LLM2VEC_FAST_AUTOTUNE=0``, so the heuristic launches the list's
first entry), and times ``flash_attn_noncausal(backend="triton")`` on an unpadded bf16
batch: the forward alone for ``fwd``, forward + backward for ``dq`` / ``dkdv`` (the other
backward kernel stays on its default tile, so differences between rows are the swept
kernel's) and for ``dkdv_atomic`` (the atomic backward: the dQ kernel's delta pass only,
then the dK/dV kernel that accumulates dQ; the other kinds run the separate backward). Tiles that
fail to compile or launch are reported and skipped. ``--layout padded`` times the masked
kernels instead (the padded LLM2Vec batch: right padding, lengths uniform in [0.3, 1] x S;
TFLOP/s on valid tokens; the mask goes through ``padding_info`` as in a patched model, so the
forward runs without its loop copy for holes), ``--layout holes`` the same lengths with every
fifth token of each sequence masked too (the loop copy for masks with holes).

    python benchmarks/sweep_attention_tiles.py --d 128 --kinds dkdv,dq
    python benchmarks/sweep_attention_tiles.py --d 64 --kinds dkdv --tiles 64x64w4s2,32x64w4s3
    python benchmarks/sweep_attention_tiles.py --d 128 --kinds dq --set dkdv=64x128w8s2
    python benchmarks/sweep_attention_tiles.py --d 128 --kinds dkdv_atomic,dkdv   # atomic vs separate backward
    python benchmarks/sweep_attention_tiles.py --d 128 --kinds fwd,dkdv --layout padded
    python benchmarks/sweep_attention_tiles.py --d 128 --kinds dkdv --tiles 64x64w4s2tma,64x64w4s2   # TMA vs pointer

A tile ending in ``tma`` is the kernel's TMA option (Hopper: loads through tensor descriptors;
it runs where the launch qualifies, ``attention._tma_ok``: the sweep's bf16 batches of 512
tokens or more do, except the forward and dQ on ``--layout holes``).

Rows (one per kind and tile, provider ``ours <tile>``; ``ms`` is the forward alone for
``fwd`` and forward + backward otherwise, ``bwd_ms`` the latter less the default forward) go to benchmarks/results/attention_tiles.jsonl with the
device, versions and git revision, and (unless ``--no-kernel-times``) each attention kernel's
device time per call (``kernel_ms``, from torch.profiler).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time


import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import comma_list, git_sha, kernel_times, positive_int  # noqa: E402

# Candidates per (kind, BLOCK_D): the current lists and their neighbours (the H200 sweep of
# 27 Nov 2026 timed the earlier ones; attention_tiles.jsonl).
DEFAULT_TILES = {
    # 64 x 64 on 4 warps, 3 stages (112 KB of shared memory, 168 registers: two blocks per SM)
    # led the 28 Nov sweep dense and padded (its 2-stage copy trailed), yet autotuned in the
    # next call's bench_attention it timed 464 TFLOP/s where 128 x 128 had 498: not listed
    # (and the TMA tiles: listed for the autotuner, never timed yet)
    ("fwd", 128): "128x128w8s3tma,128x128w8s3,128x64w8s3tma,128x64w8s3,64x64w4s3tma,64x64w4s3,128x64w8s4,128x128w8s2",
    ("fwd", 64): "128x64w8s3tma,128x64w8s3,128x128w8s3,128x64w4s3,128x32w4s3",
    ("dq", 128): "128x64w8s3tma,64x64w4s2tma,128x64w8s3,64x64w4s2,128x64w8s2,128x128w8s2",
    ("dq", 64): "64x64w4s2tma,64x64w4s2,128x64w8s2,128x32w4s2,64x128w4s2",
    ("dkdv", 128): "64x64w4s2tma,64x128w8s2tma,64x64w4s2,64x128w8s2,64x128w8s1,64x128w8s1split,32x64w4s2",
    ("dkdv", 64): "64x64w4s2tma,32x64w4s2tma,32x64w4s2,32x64w4s3,64x64w4s2,32x128w8s2",
    # the atomic backward's dK/dV kernel (its list, then tiles that spill more; never timed yet)
    ("dkdv_atomic", 128): "64x128w8s1,64x64w8s1,32x128w8s1,32x64w8s2,64x128w8s2,64x64w8s2",
    ("dkdv_atomic", 64): "64x128w8s1,64x64w8s2,32x128w8s2,64x128w8s2,64x64w4s2",
}
TILE_RE = re.compile(r"^(\d+)x(\d+)w(\d+)s(\d+)(split)?(tma)?$")


def parse_tile(s: str):
    import triton

    m = TILE_RE.match(s.strip())
    if m is None:
        raise ValueError(f"--tiles: expected entries like 64x64w4s2 (BLOCK_M x BLOCK_N, warps, stages; a dK/dV "
                         f"tile may end in 'split', its SPLIT_M option, a forward tile in 'tma'), got {s!r}")
    from llm2vec_fast.kernels.triton.attention import _cfg

    bm, bn, w, st = map(int, m.groups()[:4])
    return _cfg(bm, bn, w, st, split=bool(m.group(5)), tma=bool(m.group(6)))


KINDS = ("fwd", "dq", "dkdv", "dkdv_atomic")
HEAD_DIMS = (32, 64, 80, 96, 128, 256)


def tile_list(text: str) -> list[str]:
    """An argparse ``type``: a comma list of tiles, each checked by :func:`parse_tile`."""
    specs = [t.strip() for t in text.split(",") if t.strip()]
    if not specs:
        raise argparse.ArgumentTypeError(f"expected a comma list of tiles like 64x64w4s2, got {text!r}")
    for spec in specs:
        if TILE_RE.match(spec) is None:
            raise argparse.ArgumentTypeError(f"expected tiles like 64x64w4s2 (a dK/dV tile may end in 'split', a "
                                             f"forward tile in 'tma'), "
                                             f"got {spec!r}")
    return specs


def set_arg(text: str) -> dict[str, str]:
    """An argparse ``type``: ``kind=tile,...`` for the kinds not swept."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        kind, eq, spec = item.partition("=")
        if not eq or kind not in KINDS or TILE_RE.match(spec) is None:
            raise argparse.ArgumentTypeError(f"expected kind=tile with kind in {','.join(KINDS)} and a tile like "
                                             f"64x64w4s2, got {item!r}")
        out[kind] = spec
    return out


def layout_mask(layout: str, B: int, S: int):
    """The key padding mask (B, S) of ``--layout`` (None for dense): right padding with lengths
    uniform in [0.3, 1] x S (the first sequence full), and for ``holes`` every fifth token
    masked as well."""
    if layout == "dense":
        return None
    gen = torch.Generator().manual_seed(0)
    lens = ((torch.rand(B, generator=gen) * 0.7 + 0.3) * S).long().clamp(1, S)
    lens[0] = S
    mask = torch.arange(S)[None, :] < lens[:, None]
    if layout == "holes":
        mask &= torch.arange(S)[None, :] % 5 != 4
    return mask


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, choices=HEAD_DIMS, default=128, help="head dim")
    ap.add_argument("--b", type=positive_int, default=4)
    ap.add_argument("--s", type=positive_int, default=4096)
    ap.add_argument("--h", type=positive_int, default=32)
    ap.add_argument("--kinds", type=comma_list(KINDS), default="dkdv,dq,fwd")
    ap.add_argument("--tiles", type=tile_list, default=None, help="comma list for every kind (default: DEFAULT_TILES)")
    ap.add_argument("--rep", type=positive_int, default=40, help="do_bench rep, ms")
    ap.add_argument("--layout", choices=["dense", "padded", "holes"], default="dense",
                    help="dense: no mask; padded: right padding (the masked kernels); holes: padding plus masked tokens inside")
    ap.add_argument("--set", type=set_arg, default={}, help="tiles for the kinds not swept, e.g. dkdv=64x128w8s2,dq=64x64w4s2 "
                    "(default: each list's first entry)")
    ap.add_argument("--no-kernel-times", action="store_true", help="skip the per-kernel profile of each tile")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "attention_tiles.jsonl"))
    a = ap.parse_args(argv)
    os.environ["LLM2VEC_FAST_AUTOTUNE"] = "0"  # the heuristic launches each list's first entry
    if not torch.cuda.is_available():
        print("sweep_attention_tiles: needs a CUDA device", file=sys.stderr)
        return 2
    import triton
    import triton.testing

    from llm2vec_fast.kernels.triton import attention as att
    from llm2vec_fast.kernels.triton._tiles import tile_name
    from llm2vec_fast.ops.attention import flash_attn_noncausal

    dev = torch.device("cuda")
    torch.manual_seed(0)
    B, S, H, D = a.b, a.s, a.h, a.d
    q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16)
    mask = layout_mask(a.layout, B, S)
    valid = torch.full((B,), float(S), dtype=torch.float64) if mask is None else mask.sum(1).double()
    fwd_flops = float(4.0 * H * D * (valid * valid).sum())  # on valid tokens
    mask = None if mask is None else mask.to(dev)
    if mask is not None:
        from llm2vec_fast.hf.padding import padding_info

        padding_info(mask)  # as a patched model does: a hole-free mask is noted, the forward skips its holes copy
    bd = att._block_d(D)
    tables = {"fwd": att.FWD_CONFIGS, "dq": att.BWD_DQ_CONFIGS, "dkdv": att.BWD_DKDV_CONFIGS,
              "dkdv_atomic": att.BWD_DKDV_ATOMIC_CONFIGS}
    for kind, spec in a.set.items():
        tables[kind][bd] = [parse_tile(spec)] + [c for c in tables[kind][bd]]
    base = {kind: list(t[bd]) for kind, t in tables.items()}
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "git": git_sha(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bench": "attention_tiles", "B": B, "S": S, "H": H, "D": D, "dtype": "bfloat16",
        "layout": a.layout,
    }

    def save(row):
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    # The forward alone, once on the default tiles, so backward rows can subtract it.
    with torch.no_grad():
        t_fwd0 = triton.testing.do_bench(lambda: flash_attn_noncausal(q, k, v, mask, backend="triton"), rep=a.rep)
    print(f"default forward {t_fwd0:.3f} ms ({fwd_flops / t_fwd0 / 1e9:.1f} TFLOP/s)", flush=True)
    for kind in a.kinds:
        tiles = a.tiles or DEFAULT_TILES.get((kind, bd), "").split(",")
        for spec in filter(None, tiles):
            cfg = parse_tile(spec)
            tables[kind][bd] = [cfg]
            # dkdv_atomic rows time the atomic backward (the dQ kernel's delta pass, then the dK/dV kernel)
            os.environ["LLM2VEC_FAST_ATTN_BWD"] = "atomic" if kind == "dkdv_atomic" else "separate"
            try:
                if kind == "fwd":
                    def step():
                        with torch.no_grad():
                            flash_attn_noncausal(q, k, v, mask, backend="triton")
                else:
                    def step():
                        o = flash_attn_noncausal(q, k, v, mask, backend="triton")
                        torch.autograd.grad(o, (q, k, v), g)
                step()
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(step, rep=a.rep)
                # profiled while the swept tile is still the table's only entry (the launcher
                # reads the table at every launch; restored below, it profiled the default)
                kms = None if a.no_kernel_times else kernel_times(step, iters=5, match="attn")
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{kind:5s} {spec:12s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                save({**meta, "kind": kind, "provider": f"ours {spec}", "error": f"{type(e).__name__}: {str(e)[:300]}"})
                continue
            finally:
                tables[kind][bd] = list(base[kind])
            bwd_ms = ms - t_fwd0 if kind != "fwd" else None
            tf = fwd_flops / ms / 1e9 if kind == "fwd" else 2.5 * fwd_flops / bwd_ms / 1e9
            print(f"{kind:5s} {spec:12s} {ms:8.3f} ms  {'bwd ' + format(bwd_ms, '.3f') + ' ms ' if bwd_ms else ''}"
                  f"{tf:6.1f} TFLOP/s ({'fwd' if kind == 'fwd' else 'bwd, others on defaults'})"
                  + (f"  kernels {kms}" if kms else ""), flush=True)
            save({**meta, "kind": kind, "provider": f"ours {spec}", "ms": ms, "bwd_ms": bwd_ms, "tflops": tf,
                  "kernel_ms": kms,
                  "defaults": {kk: tile_name(v[0]) for kk, v in base.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())

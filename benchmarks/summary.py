"""Regenerate ``benchmarks/results/SUMMARY.md`` from every ``benchmarks/results/*.jsonl``.

For each benchmark file and device the latest row of every (case, provider) is kept; within
a case, "ours" is the fastest of our providers (``ours*``, ``patched``, ``llm2vec_fast``,
``triton``) and every other provider is a peer, reported as ``peer ms / ours ms`` (above 1:
ours is faster) and, where both rows carry a peak memory, ``ours / peer`` memory; a peer row
from another run than ours (other git / torch / triton) is marked ``*``. Attention
rows are also set against published figures (``ANCHORS_D128`` / ``ANCHORS_D64`` below: H100, bf16,
non-causal, TFLOP/s on valid tokens). End-to-end rows are checked against the targets (GPU:
>= 2x faster, <= 0.5x peak memory; CPU: <= 0.8x time, <= 0.5x peak memory).

    python benchmarks/summary.py [--results-dir DIR] [--out PATH]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")

CONTEXT_KEYS = {"device", "torch", "triton", "transformers", "git", "time", "preset"}
# Keys that are measurements (or derived from them), never part of a case's identity.
MEASURE_KEYS = {
    "ms", "ms_p20", "ms_p80", "peak_mem_mb", "step_mem_mb", "mem_kind", "tflops", "tokens_per_s", "texts_per_s",
    "cpu_ms", "loss0", "steps", "speedup_vs_stock", "mem_ratio_vs_stock", "loss0_diff_vs_stock", "max_err",
    "note", "gbps", "seconds", "threads", "tiles", "device_gaps", "error",
}
MEASURE_SUFFIXES = ("_ms", "_mb", "_per_s", "_vs_stock", "_err", "_diff", "_ratio", "_speedup")
OURS_PREFIXES = ("ours", "patched", "llm2vec_fast", "llm2vec-fast", "triton", "fast")

# Published figures: non-causal attention, bf16, H100, head dim 128 (FlashAttention-3 paper figs. 5-6).
ANCHOR_S = (512, 1024, 2048, 4096, 8192, 16384)
ANCHORS_D128 = {
    "fwd": {
        "FlashAttention-2": (309, 350, 362, 368, 370, 370),
        "Triton tutorial": (323, 372, 389, 389, 392, 395),
        "cuDNN": (497, 574, 617, 609, 600, 595),
        "FlashAttention-3": (467, 565, 625, 638, 646, 648),
    },
    "bwd": {
        "FlashAttention-2": (214, 260, 291, 310, 318, 322),
        "cuDNN": (305, 408, 465, 499, 518, 516),
        "FlashAttention-3": (316, 424, 501, 542, 559, 561),
    },
}
ANCHORS_D64 = {"fwd": {"FlashAttention-2": 320, "FlashAttention-3": 485}, "bwd": {"FlashAttention-2": 280, "FlashAttention-3": 460}}
TARGETS_D128 = {"fwd": 500, "bwd": 380}  # at S >= 4k


def is_measure(k: str) -> bool:
    return k in MEASURE_KEYS or k.endswith(MEASURE_SUFFIXES)


def is_ours(provider: str) -> bool:
    return str(provider).lower().startswith(OURS_PREFIXES)


def load_rows(results_dir: str) -> dict[str, list[dict]]:
    out = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        rows = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a truncated line (a run killed mid-write) is skipped, not fatal
        if rows:
            out[os.path.splitext(os.path.basename(path))[0]] = rows
    return out


def case_key(row: dict) -> tuple:
    return tuple(sorted(
        (k, json.dumps(v, sort_keys=True)) for k, v in row.items()
        if k not in CONTEXT_KEYS and k != "provider" and k != "bench" and not is_measure(k)
    ))


def latest_by_case(rows: list[dict]) -> "OrderedDict[tuple, dict[str, dict]]":
    """case key -> provider -> the most recent row (ISO times sort as strings)."""
    cases: OrderedDict = OrderedDict()
    for r in sorted(rows, key=lambda r: str(r.get("time", ""))):
        prov = str(r.get("provider", "?"))
        cases.setdefault(case_key(r), {})[prov] = r
    return cases


def fmt_case(key: tuple) -> str:
    parts = []
    for k, v in key:
        v = json.loads(v)
        if v is None or v is False:
            continue
        parts.append(k if v is True else f"{k}={v}")
    return " ".join(parts)


def fmt_ms(ms) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_mb(mb) -> str:
    return "-" if mb is None else (f"{mb:.0f}" if mb >= 10 else f"{mb:.2g}")


def anchor_for(row: dict) -> str:
    """The published figures nearest to an attention row's S (H100 / H200, bf16, D 64 / 128)."""
    mode, D, S = row.get("mode"), row.get("D"), row.get("S")
    dev = str(row.get("device", ""))
    if mode not in ("fwd", "bwd") or str(row.get("dtype")) not in ("bfloat16", "bf16") or not S:
        return ""
    if "H100" not in dev and "H200" not in dev:
        return ""
    if D == 128:
        i = min(range(len(ANCHOR_S)), key=lambda j: abs(ANCHOR_S[j] - S))
        figs = ", ".join(f"{n} {v[i]}" for n, v in ANCHORS_D128[mode].items())
        tgt = f"; target >= {TARGETS_D128[mode]}" if S >= 4096 else ""
        return f"S~{ANCHOR_S[i]}: {figs}{tgt}"
    if D == 64:
        return ", ".join(f"{n} ~{v}" for n, v in ANCHORS_D64[mode].items())
    return ""


def table_for(name: str, rows: list[dict]) -> list[str]:
    lines = []
    by_dev: OrderedDict = OrderedDict()
    for r in rows:
        by_dev.setdefault(str(r.get("device", "?")), []).append(r)
    for dev, drows in by_dev.items():
        cases = latest_by_case(drows)
        newest = max(drows, key=lambda r: str(r.get("time", "")))
        lines.append(f"### {name} on {dev}")
        lines.append("")
        lines.append(
            f"Latest run {newest.get('time', '?')}, git {newest.get('git', '?')}, torch {newest.get('torch')}, "
            f"triton {newest.get('triton')}, transformers {newest.get('transformers')}"
            + (f", preset {newest['preset']}" if newest.get("preset") else "") + "."
        )
        lines.append("")
        if dev.startswith("cpu") and name not in ("e2e", "encode"):
            lines.append("CPU rows of the Triton providers check the harness, not speed: without a GPU they run "
                         "under the Triton interpreter (TRITON_INTERPRET=1) or are skipped. Rows whose ours is a "
                         "torch-backend provider (``ours_torch``) are this CPU's speed.")
            lines.append("")
        has_tflops = any("tflops" in r for r in drows)
        head = ["case", "ours", "ours ms"]
        if has_tflops:
            head.append("ours TFLOP/s")
        head += ["ours MB", "peers: speed-up of ours (peer ms / ours ms)", "memory ours / peer"]
        if name == "attention":
            head.append("published (TFLOP/s)")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        any_stale = False
        for key, provs in cases.items():
            ours = [r for p, r in provs.items() if is_ours(p) and r.get("ms")]
            peers = {p: r for p, r in provs.items() if not is_ours(p) and r.get("ms")}
            if not ours:
                # no row of ours for this case: list the peers' raw times
                raw = ", ".join(f"{p} {fmt_ms(r['ms'])} ms" for p, r in peers.items())
                cells = [fmt_case(key), "-", "-"] + (["-"] if has_tflops else []) + ["-", raw, "-"]
                if name == "attention":
                    cells.append("")
                lines.append("| " + " | ".join(cells) + " |")
                continue
            best = min(ours, key=lambda r: r["ms"])
            run = lambda r: (r.get("git"), r.get("torch"), r.get("triton"))  # noqa: E731
            stale = {p for p, r in peers.items() if run(r) != run(best)}
            any_stale = any_stale or bool(stale)
            speed = ", ".join(f"{p} {r['ms'] / best['ms']:.2f}x" + ("*" if p in stale else "")
                              for p, r in sorted(peers.items()))
            mem = ", ".join(
                f"{p} {best['peak_mem_mb'] / r['peak_mem_mb']:.2f}x" for p, r in sorted(peers.items())
                if best.get("peak_mem_mb") and r.get("peak_mem_mb")
            )
            cells = [fmt_case(key), str(best.get("provider")), fmt_ms(best["ms"])]
            if has_tflops:
                cells.append("-" if best.get("tflops") is None else f"{best['tflops']:.1f}")
            cells += [fmt_mb(best.get("peak_mem_mb")), speed or "-", mem or "-"]
            if name == "attention":
                cells.append(anchor_for(best))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if any_stale:
            lines += ["\\* the peer's latest row comes from another run than ours (other git / torch / triton).", ""]
        if name == "e2e":
            lines += e2e_checks(cases, dev)
    return lines


def e2e_checks(cases, dev: str) -> list[str]:
    """Pass / fail of each patched-vs-stock pair against its target."""
    out = []
    cpu = dev.startswith("cpu")
    t_time, t_mem = (0.8, 0.5) if cpu else (0.5, 0.5)
    for key, provs in cases.items():
        s, f = provs.get("stock"), provs.get("patched")
        if not (s and f and s.get("ms") and f.get("ms")):
            continue
        tr = f["ms"] / s["ms"]
        mr = f["peak_mem_mb"] / s["peak_mem_mb"] if s.get("peak_mem_mb") and f.get("peak_mem_mb") else None
        sr = f["step_mem_mb"] / s["step_mem_mb"] if (s.get("step_mem_mb") or 0) > 0 and f.get("step_mem_mb") is not None else None
        verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
        cpu_t = f" (process CPU time {f['cpu_ms'] / s['cpu_ms']:.2f}x)" if f.get("cpu_ms") and s.get("cpu_ms") else ""
        out.append(
            f"- {fmt_case(key)}: patched {fmt_ms(f['ms'])} ms vs stock {fmt_ms(s['ms'])} ms per step "
            f"(**{tr:.2f}x** time{cpu_t}, target <= {t_time}x: {verdict(tr <= t_time)}); "
            f"{f.get('tokens_per_s', 0):.0f} vs {s.get('tokens_per_s', 0):.0f} tokens/s; "
            f"peak {fmt_mb(f.get('peak_mem_mb'))} vs {fmt_mb(s.get('peak_mem_mb'))} MB "
            f"(**{'-' if mr is None else f'{mr:.2f}'}x**, target <= {t_mem}x: {verdict(mr is not None and mr <= t_mem)}; "
            f"{s.get('mem_kind', '')}); above the loaded model {fmt_mb(f.get('step_mem_mb'))} vs "
            f"{fmt_mb(s.get('step_mem_mb'))} MB ({'-' if sr is None else f'{sr:.2f}'}x); first-step loss "
            f"{f.get('loss0', float('nan')):.6f} vs {s.get('loss0', float('nan')):.6f}"
        )
    if out:
        out.append("")
    return out


ORDER = ["attention", "masked_ce", "info_nce", "e2e", "encode"]


def generate(results_dir: str = RESULTS_DIR, out_path: str | None = None) -> str:
    """Write SUMMARY.md (default ``<results_dir>/SUMMARY.md``) and return its text."""
    data = load_rows(results_dir)
    names = [n for n in ORDER if n in data] + sorted(n for n in data if n not in ORDER)
    lines = [
        "# Benchmark summary",
        "",
        "Generated by `python benchmarks/summary.py` from `benchmarks/results/*.jsonl` (the latest row of each "
        "case and provider). Speed-ups are peer time / our time (above 1: ours is faster); memory is our peak / "
        "the peer's (below 1: ours uses less). Attention TFLOP/s count valid tokens only (4·Σsᵢ²·H·D forward, "
        "2.5x backward, 3.5x both). Published figures: the FlashAttention-3 paper's (H100, bf16; "
        "ANCHORS_D128 in benchmarks/summary.py).",
        "",
    ]
    if not names:
        lines.append("No results yet: run `llm2vec-fast bench --preset cpu` (or gpu-quick / gpu-full).")
    for n in names:
        lines += [f"## {n}", ""] + table_for(n, data[n])
    text = "\n".join(lines).rstrip() + "\n"
    out_path = out_path or os.path.join(results_dir, "SUMMARY.md")
    with open(out_path, "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results-dir", default=RESULTS_DIR)
    ap.add_argument("--out", default=None, help="default: <results-dir>/SUMMARY.md")
    ap.add_argument("--print", action="store_true", help="also print the summary")
    args = ap.parse_args(argv)
    text = generate(args.results_dir, args.out)
    if args.print:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``llm2vec-fast bench``: run every benchmark of a preset and regenerate the summary.

Runs ``benchmarks/bench_{attention,masked_ce,info_nce,e2e,encode}.py`` one after the other,
each as ``python benchmarks/bench_X.py --preset P --device D [--out-dir DIR]`` in its own
process (a crash or a timeout in one does not stop the others; a script not present is
skipped with a note), then rewrites ``benchmarks/results/SUMMARY.md`` from all rows. The
benchmark scripts live in the source checkout, not in the installed package: they are looked
up next to the package (editable install), then under the current directory.
"""
from __future__ import annotations

HELP = "run the benchmark suite (per-op, end-to-end, encode) and regenerate benchmarks/results/SUMMARY.md"

SCRIPTS = ("attention", "masked_ce", "info_nce", "e2e", "encode")
PRESETS = ("cpu", "gpu-quick", "gpu-full")


def add_arguments(p):
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="cpu (minutes on 2 cores), gpu-quick (~4 min on an H100), gpu-full; default: cpu without CUDA, "
                        "gpu-quick with it")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cpu for the cpu preset, else cuda")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SCRIPTS)}")
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per benchmark script (default: none)")
    p.add_argument("--benchmarks-dir", default=None, help="folder holding bench_*.py (default: found automatically)")
    p.add_argument("--no-summary", action="store_true", help="do not regenerate SUMMARY.md")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def find_benchmarks_dir(explicit=None) -> str | None:
    import os

    import llm2vec_fast

    cands = [explicit] if explicit else [
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(llm2vec_fast.__file__))), "benchmarks"),
        os.path.join(os.getcwd(), "benchmarks"),
    ]
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "common.py")):
            return os.path.abspath(c)
    return None


def _run(cmd, timeout, cwd) -> int:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (workers included)."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, cwd=cwd, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 124
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def run(args) -> int:
    import os
    import sys
    import time

    if args.timeout is not None and not args.timeout > 0:  # (NaN fails too)
        print(f"llm2vec-fast bench: error: --timeout: expected seconds > 0, got {args.timeout}", file=sys.stderr)
        return 2
    preset = args.preset
    if preset is None:
        import torch

        preset = "gpu-quick" if torch.cuda.is_available() else "cpu"
    device = args.device or ("cpu" if preset == "cpu" else "cuda")
    bdir = find_benchmarks_dir(args.benchmarks_dir)
    if bdir is None:
        print("llm2vec-fast bench: no benchmarks/ folder found (run from the source checkout, or pass "
              "--benchmarks-dir)", file=sys.stderr)
        return 2
    names = SCRIPTS if not args.only else tuple(n.strip() for n in args.only.split(",") if n.strip())
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        print(f"--only: unknown benchmark(s) {unknown}; expected a subset of {list(SCRIPTS)}", file=sys.stderr)
        return 2
    repo = os.path.dirname(bdir)
    status = {}
    t_all = time.time()
    for n in names:
        script = os.path.join(bdir, f"bench_{n}.py")
        if not os.path.isfile(script):
            print(f"[bench] {n}: {os.path.relpath(script, repo)} not present yet, skipped", flush=True)
            status[n] = "missing"
            continue
        cmd = [sys.executable, script, "--preset", preset, "--device", device]
        if args.out_dir:
            cmd += ["--out-dir", os.path.abspath(args.out_dir)]
        print(f"[bench] {n}: {' '.join(cmd)}" + (f"  (timeout {args.timeout:.0f} s)" if args.timeout else ""), flush=True)
        if args.dry_run:
            status[n] = "dry-run"
            continue
        t0 = time.time()
        rc = _run(cmd, args.timeout, repo)
        dt = time.time() - t0
        status[n] = "ok" if rc == 0 else ("timeout" if rc == 124 else f"failed rc={rc}")
        print(f"[bench] {n}: {status[n]} in {dt:.0f} s", flush=True)
    summary_cmd = [sys.executable, os.path.join(bdir, "summary.py")]
    if args.out_dir:
        summary_cmd += ["--results-dir", os.path.abspath(args.out_dir)]
    if not args.no_summary:
        print(f"[bench] summary: {' '.join(summary_cmd)}", flush=True)
        if not args.dry_run:
            rc = _run(summary_cmd, 120, repo)
            if rc != 0:
                status["summary"] = f"failed rc={rc}"
    print(f"[bench] done in {time.time() - t_all:.0f} s: " + ", ".join(f"{k} {v}" for k, v in status.items()), flush=True)
    return 0 if all(v in ("ok", "missing", "dry-run") for v in status.values()) else 1

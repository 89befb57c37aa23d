"""Shared benchmark plumbing: timing, memory, and result rows with device and versions.

Every benchmark script appends JSON lines to ``benchmarks/results/<name>.jsonl``; a row
carries the device, torch / triton / transformers versions, the git sha and a UTC time,
so a number never exists without the context that produced it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def git_sha() -> str:
    """The short revision the rows are stamped with: ``LLM2VEC_FAST_GIT_REV`` when set, else
    ``git rev-parse --short HEAD``. The device tool's copy of the checkout carried a ``.git``
    that lagged the working tree it ran (28 Nov: rows of the tree at 5b755ec stamped 345bdf3,
    the session's first HEAD), so a device call sets the variable to the local HEAD."""
    if os.environ.get("LLM2VEC_FAST_GIT_REV"):
        return os.environ["LLM2VEC_FAST_GIT_REV"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except Exception:
        return "unknown"


def device_name(device: str, threads: int | None = None) -> str:
    """The GPU's name, or ``cpu:<processor> x<N> threads`` with N the torch CPU threads the
    measured work ran with: ``threads`` when that was another process or another setting
    (a benchmark's workers), else this process's ``torch.get_num_threads()``."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    n = threads if threads else torch.get_num_threads()
    return f"cpu:{platform.processor() or platform.machine()} x{n} threads"


def context(device: str, threads: int | None = None) -> dict:
    return {
        "device": device_name(device, threads),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "git": git_sha(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def append_rows(name: str, rows: list[dict], device: str, out_dir: str | None = None,
                threads: int | None = None) -> str:
    """Append ``rows`` (each merged with the run's context) to ``<out_dir>/<name>.jsonl``;
    ``threads``: the CPU threads the rows' work ran with, when not this process's count
    (see :func:`device_name`)."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    ctx = context(device, threads)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps({**ctx, **r}) + "\n")
    return path


# --------------------------------------------------------------------------------------
# argparse types: a bad option value stops a script at parse time (argparse's one-line
# error, exit status 2) instead of a traceback, or a run that measures nothing, later on
# --------------------------------------------------------------------------------------


def int_at_least(lo: int):
    """An argparse ``type``: an int >= ``lo``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an int >= {lo}, got {v}")
        return v

    parse.__name__ = f"int >= {lo}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def comma_list(choices):
    """An argparse ``type``: a non-empty comma-separated list, each item one of ``choices``
    (returned as a list, in the order given, without repeats)."""
    choices = list(choices)

    def parse(text: str) -> list[str]:
        items = []
        for x in (t.strip() for t in text.split(",")):
            if x and x not in items:
                items.append(x)
        bad = [x for x in items if x not in choices]
        if bad or not items:
            got = ",".join(bad) if bad else repr(text)
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(choices)}, got {got}")
        return items

    parse.__name__ = "comma-separated list"
    return parse


def shape_arg(text: str) -> tuple[int, int]:
    """An argparse ``type``: ``BxT`` with B, T >= 1 (``8x128``)."""
    parts = text.lower().split("x")
    try:
        b, t = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BxT with two ints >= 1 (8x128), got {text!r}") from None
    if b < 1 or t < 1:
        raise argparse.ArgumentTypeError(f"expected BxT with two ints >= 1 (8x128), got {text!r}")
    return b, t


def device_arg(text: str) -> str:
    """An argparse ``type``: ``cpu``, ``cuda`` or ``cuda:N``."""
    head, _, idx = text.partition(":")
    if text == "cpu" or (head == "cuda" and (not _ or idx.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def allocation_peak(fn) -> tuple[int, int]:
    """``(peak, net)`` bytes that ``fn()`` allocated through torch's CPU allocator above what
    was live before it: the profiler's allocation / free events summed in time order (what
    ``torch.cuda.max_memory_allocated`` after a reset measures on a GPU, here for CPU
    tensors). Frees of blocks allocated before the call carry no size and are left out, so
    the figures can only err high, except where garbage from before the call is collected
    inside it: blocks allocated under an earlier profile keep their sizes, so their frees
    would be subtracted (Triton interpreter launches leave reference cycles holding their
    tensor arguments). A collection first keeps that out of the window."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, cur


def bench(fn, device: str, *, warmup: int = 3, rep: int = 10) -> dict:
    """Median / p20 / p80 milliseconds of ``fn()`` and its peak memory.

    CUDA: ``triton.testing.do_bench`` quantiles and ``max_memory_allocated`` after a reset
    (bytes above what was allocated before the call). CPU: wall-clock over ``rep`` runs, and
    the peak from the CPU allocator's events over one more, untimed, call
    (:func:`allocation_peak`).
    """
    if str(device).startswith("cuda"):
        import triton.testing

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2], "peak_mem_mb": peak / 2**20}
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    peak, _ = allocation_peak(fn)
    return {
        "ms": statistics.median(ts),
        "ms_p20": ts[int(0.2 * (len(ts) - 1))],
        "ms_p80": ts[int(0.8 * (len(ts) - 1))],
        "peak_mem_mb": peak / 2**20,
    }


def kernel_times(step, iters: int = 3, match: str | None = None, top: int = 10, device: str = "cuda") -> dict:
    """Milliseconds per call of ``step``'s most expensive kernels (torch.profiler): device
    kernels on CUDA, operators' own CPU time on ``device="cpu"``; the ``top`` most expensive,
    optionally only names containing ``match``. Says where a measured time goes (a
    backward's dQ vs dK/dV kernels, a loss's GEMMs vs its row kernel vs copies). The entry
    ``"(all kernels)"`` is the sum over every kernel (or operator) the profiler saw, listed
    or not: beside a wall-clock time it says how long the device sat idle (host-bound gaps).
    The calls run back to back; :func:`kernel_times_and_gaps` gives this and
    :func:`device_gaps` from one profiler session."""
    from torch.profiler import ProfilerActivity, profile

    cuda = str(device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step()
        sync()
    return _rank_kernels(prof, iters, cuda, match, top)


def _rank_kernels(prof, iters: int, cuda: bool, match: str | None, top: int) -> dict:
    times, total = {}, 0.0
    for e in prof.key_averages():
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if ((e.device_type.name == "CUDA") == cuda and (match is None or match in e.key) and us > 0
                and not e.key.startswith(_CALL_RANGE)):
            times[e.key[:80]] = round(us / 1e3 / iters, 4)
            total += us
    out = {"(all kernels)": round(total / 1e3 / iters, 4)}
    out.update(sorted(times.items(), key=lambda kv: -kv[1])[:top])
    return out


def idle_gaps(window: tuple[float, float], busy: list[tuple[float, float, str]], top: int = 3) -> dict:
    """Where the device sat idle within one call: ``window`` = (call start on the host, µs),
    ``busy`` = the device's activities in it as ``(start, end, name)`` µs. Returns ``span_us``
    (call start to the last activity's end), ``busy_us`` (their union), ``idle_us`` (the rest)
    and the ``top`` longest gaps, each ``{"us", "after", "before"}`` (``after`` is
    ``"(call start)"`` for the wait before the first activity). Overlapping activities (two
    streams) count once."""
    t0 = window[0]
    acts = sorted((max(s, t0), e, n) for s, e, n in busy if e > t0)
    if not acts:
        return {"span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "gaps": []}
    gaps, busy_us, cur_end, prev = [], 0.0, t0, "(call start)"
    for s, e, n in acts:
        if s > cur_end:
            gaps.append({"us": round(s - cur_end, 1), "after": prev[:60], "before": n[:60]})
        busy_us += max(0.0, e - max(s, cur_end))
        if e > cur_end:
            cur_end, prev = e, n
    span = cur_end - t0
    gaps.sort(key=lambda g: -g["us"])
    return {"span_us": round(span, 1), "busy_us": round(busy_us, 1), "idle_us": round(span - busy_us, 1),
            "gaps": gaps[:top]}


def device_gaps(step, iters: int = 3, top: int = 3, device: str = "cuda") -> dict:
    """Idle time of the device within calls of ``step`` (torch.profiler), for rows whose
    wall-clock time exceeds their kernels' (``kernel_times``' ``(all kernels)``): each call
    runs after a synchronize (an idle device, as in ``do_bench`` after its cache flush) inside
    a profiler range; :func:`idle_gaps` of the call's device activities (kernels, copies,
    memsets) from the range's start. The last call's result, with ``idle_us`` per call
    averaged over all. On ``device="cpu"`` the activities are the operators the step calls
    directly (a test of the plumbing). Under the profiler each launch costs the host a few µs
    more than in the timed runs, so gaps are upper bounds. A failure here is reported as
    ``{"error": ...}`` and never costs the row its timing."""
    try:
        return _gaps(_profile_calls(step, iters, device), iters, top, device)
    except Exception as e:  # noqa: BLE001 - a diagnostic, not the measurement
        return _error(e)


def kernel_times_and_gaps(step, iters: int = 3, top: int = 10, gap_top: int = 3, device: str = "cuda"):
    """``(kernel_times(step), device_gaps(step))`` from one profiler session, the calls run as
    :func:`device_gaps` runs them (each after a synchronize; a kernel's duration does not
    depend on that). Diagnostics, not the measurement: a failure makes the part it hit
    ``{"error": ...}`` and never costs the row its timing."""
    cuda = str(device).startswith("cuda")
    try:
        prof = _profile_calls(step, iters, device)
    except Exception as e:  # noqa: BLE001
        return _error(e), _error(e)
    out = []
    for part in (lambda: _rank_kernels(prof, iters, cuda, None, top), lambda: _gaps(prof, iters, gap_top, device)):
        try:
            out.append(part())
        except Exception as e:  # noqa: BLE001
            out.append(_error(e))
    return tuple(out)


def _error(e: Exception) -> dict:
    return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


_CALL_RANGE = "device_gaps_call_"


def _profile_calls(step, iters: int, device: str):
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = str(device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=acts) as prof:
        for i in range(iters):
            with record_function(f"{_CALL_RANGE}{i}"):
                step()
            sync()
    return prof


def _gaps(prof, iters: int, top: int, device: str) -> dict:
    cuda = str(device).startswith("cuda")
    events = list(prof.events())
    results = []
    for i in range(iters):
        call = next(e for e in events if e.name == f"{_CALL_RANGE}{i}" and e.device_type.name == "CPU")
        start = call.time_range.start
        nxt = next((e.time_range.start for e in events if e.name == f"{_CALL_RANGE}{i + 1}"
                    and e.device_type.name == "CPU"), float("inf"))
        if cuda:
            # kernels, copies, memsets; not the profiler's GPU-side copy of the call's range
            busy = [(e.time_range.start, e.time_range.end, e.name) for e in events
                    if e.device_type.name == "CUDA" and start <= e.time_range.start < nxt
                    and not e.name.startswith(_CALL_RANGE) and not getattr(e, "is_user_annotation", False)]
        else:
            busy = [(e.time_range.start, e.time_range.end, e.name) for e in events
                    if e.cpu_parent is call]
        results.append(idle_gaps((start, call.time_range.end), busy, top))
    out = dict(results[-1])
    out["idle_us_mean"] = round(sum(r["idle_us"] for r in results) / iters, 1)
    return out

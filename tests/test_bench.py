"""The benchmark harness: SUMMARY.md from fabricated rows, gpu_check.sh --dry-run, the bench
subcommand's arguments, a tiny end-to-end run (2-layer SmolLM2-shaped model, stock vs patched),
and the attention and masked-CE scripts' smoke presets (every provider the GPU run times, ours
interpreted; the padded attention peers checked against the reference)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(path, rows):
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


CTX = dict(torch="2.11.0+cu130", triton="3.6.0", transformers="5.17.0", git="abc1234")


def test_summary_ratios_latest_rows_anchors_and_e2e_verdicts(tmp_path):
    summary = _load("summary")
    h100 = "NVIDIA H100 80GB HBM3"
    case = dict(bench="attention", case="unpadded", B=4, S=4096, H=32, Hkv=32, D=128, dtype="bfloat16", mode="fwd")
    _write(tmp_path / "attention.jsonl", [
        # an old row of ours for the same case: the newer one must win
        dict(CTX, device=h100, time="2026-01-01T00:00:00+00:00", provider="ours", ms=9.0, tflops=100.0, **case),
        dict(CTX, device=h100, time="2026-01-02T00:00:00+00:00", provider="ours", ms=2.0, tflops=450.0,
             peak_mem_mb=100.0, **case),
        dict(CTX, device=h100, time="2026-01-02T00:00:00+00:00", provider="sdpa-flash", ms=3.0, tflops=300.0,
             peak_mem_mb=400.0, **case),
        dict(CTX, device=h100, time="2026-01-02T00:00:00+00:00", provider="hf-sdpa", ms=7.0, tflops=130.0, **case),
    ])
    e2e = dict(bench="e2e", config="smollm2-135m", batch=8, seq=128, dtype="float32", grad_ckpt=False, lora_r=16)
    cpu = "cpu:x86_64 x2 threads"
    _write(tmp_path / "e2e.jsonl", [
        dict(CTX, device=cpu, time="2026-01-03T00:00:00+00:00", task="mntp", provider="stock", ms=8000.0,
             peak_mem_mb=6000.0, step_mem_mb=5000.0, tokens_per_s=128.0, loss0=10.9, **e2e),
        dict(CTX, device=cpu, time="2026-01-03T00:00:00+00:00", task="mntp", provider="patched", ms=4000.0,
             peak_mem_mb=2400.0, step_mem_mb=1500.0, tokens_per_s=256.0, loss0=10.9, **e2e),
        dict(CTX, device=cpu, time="2026-01-03T00:00:00+00:00", task="simcse", provider="stock", ms=1000.0,
             peak_mem_mb=1000.0, tokens_per_s=10.0, loss0=2.0, **e2e),
        dict(CTX, device=cpu, time="2026-01-03T00:00:00+00:00", task="simcse", provider="patched", ms=900.0,
             peak_mem_mb=900.0, tokens_per_s=11.0, loss0=2.0, **e2e),
    ])
    (tmp_path / "broken.jsonl").write_text('{"provider": "ours", "ms": 1.0}\n{"truncated": \n')
    text = summary.generate(str(tmp_path))
    assert (tmp_path / "SUMMARY.md").read_text() == text
    att = text[text.index("## attention"): text.index("## e2e")]
    assert "hf-sdpa 3.50x" in att and "sdpa-flash 1.50x" in att, att  # peer ms / ours ms, newest ours row
    assert "450.0" in att and "sdpa-flash 0.25x" in att  # TFLOP/s, memory ours / peer
    assert "FlashAttention-3 638" in att and "target >= 500" in att  # S=4096, D=128 anchors
    assert "4.50x" not in att  # the stale 9 ms row of ours was not used
    e2e_part = text[text.index("## e2e"):]
    mntp = next(l for l in e2e_part.splitlines() if l.startswith("- ") and "task=mntp" in l)
    simcse = next(l for l in e2e_part.splitlines() if l.startswith("- ") and "task=simcse" in l)
    assert "**0.50x** time" in mntp and "target <= 0.8x: PASS" in mntp, mntp
    assert "**0.40x**" in mntp and "target <= 0.5x: PASS" in mntp and "(0.30x)" in mntp, mntp
    assert "**0.90x** time" in simcse and "target <= 0.8x: FAIL" in simcse, simcse
    assert "**0.90x**," in simcse and "target <= 0.5x: FAIL" in simcse, simcse
    assert "## broken" in text  # an unknown file still gets a table; the truncated line is skipped


def test_summary_pairs_rows_with_diagnostics_and_marks_peers_of_another_run(tmp_path):
    """Rows of ours carry ``device_gaps`` (a dict) on CUDA: a diagnostic, not part of the case
    (it split ours from its peers); a peer whose latest row is from another run is marked."""
    summary = _load("summary")
    h100 = "NVIDIA H100 80GB HBM3"
    case = dict(bench="masked_ce", V=32000, tokens=16384, frac=0.2, dtype="bfloat16", mode="full")
    t1, t2 = "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00"
    _write(tmp_path / "masked_ce.jsonl", [
        dict(CTX, device=h100, time=t1, provider="liger", ms=9.0, **case),
        dict(CTX, device=h100, time=t1, provider="torch-full", ms=12.0, **case),
        dict(CTX, device=h100, time=t2, provider="ours", ms=3.0, kernel_ms={"k": 1.0},
             device_gaps={"idle_ms": 0.1, "gaps": [[1, 0.05]]}, **case),
        dict(CTX, device=h100, time=t2, provider="torch-full", ms=15.0, **case),
        dict(CTX, device=h100, time=t2, provider="liger-bad", error="RuntimeError: x", **case),
    ])
    _write(tmp_path / "masked_ce.jsonl", [dict(r, git="new") if r["time"] == t2 else r
                                          for r in map(json.loads, open(tmp_path / "masked_ce.jsonl"))])
    text = summary.generate(str(tmp_path))
    rows = [l for l in text.splitlines() if l.startswith("| ") and "V=32000" in l]
    assert len(rows) == 1, rows  # one case: ours with its peers
    assert "torch-full 5.00x" in rows[0] and "liger 3.00x*" in rows[0], rows[0]
    assert "another run" in text


def test_summary_with_no_results(tmp_path):
    text = _load("summary").generate(str(tmp_path))
    assert "No results yet" in text


def test_gpu_check_dry_run_lists_everything_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                       env=env, cwd=str(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    s = r.stdout
    assert "pip install -q --no-deps --no-build-isolation -e ." in s
    assert "-m pytest -m gpu -v" in s and "timeout" in s
    assert "bench_attention.py --preset gpu-quick --device cuda" in s
    assert "bench_masked_ce.py --preset gpu-quick --device cuda" in s
    assert "bench_e2e.py" not in s  # closed issues' benchmarks: only on request (they did not fit)
    assert "benchmarks/summary.py" in s and f"{out}/results" in s
    assert s.index("summary.py") > s.index("bench_masked_ce.py") > s.index("bench_attention.py") > s.index("pytest")
    assert not out.exists()  # a dry run creates nothing
    # the closed issues' benchmarks in a call of their own, tests skipped
    env2 = dict(env, GPU_CHECK_TEST_TIMEOUT="0", GPU_CHECK_BENCH_TIMEOUTS="info_nce=100 e2e=250 encode=150")
    s2 = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                        env=env2, cwd=str(tmp_path), timeout=60).stdout
    assert "tests skipped" in s2 and "-m pytest" not in s2
    assert "bench_e2e.py --preset gpu-quick --device cuda --profile" in s2 and "bench_encode.py" in s2
    assert "--providers stock,patched,patched_packed" in s2  # the packed MNTP provider measured on the GPU
    assert "sweep_attention_tiles.py" not in s  # sweeps only on request
    env3 = dict(env, GPU_CHECK_TEST_TIMEOUT="0", GPU_CHECK_BENCH_TIMEOUTS="",
                GPU_CHECK_SWEEPS="--kinds fwd --no-kernel-times; ;--kinds dq --layout padded --b 16")
    s3 = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                        env=env3, cwd=str(tmp_path), timeout=60).stdout
    sweeps = [ln for ln in s3.splitlines() if "sweep_attention_tiles.py" in ln]
    assert len(sweeps) == 2 and sweeps[0].endswith("sweep_attention_tiles.py --kinds fwd --no-kernel-times")
    assert sweeps[1].endswith("--kinds dq --layout padded --b 16") and s3.index("sweep_attention") < s3.index("summary.py")
    bad = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2


def test_bench_subcommand_help_and_dry_run(capsys):
    from llm2vec_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    h = capsys.readouterr().out
    assert "--preset" in h and "gpu-quick" in h and "--only" in h
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "tpu"])
    capsys.readouterr()
    assert main(["bench", "--preset", "cpu", "--dry-run", "--only", "e2e,encode"]) == 0
    s = capsys.readouterr().out
    assert "bench_e2e.py --preset cpu --device cpu" in s and "bench_encode.py --preset cpu --device cpu" in s
    assert "bench_attention.py" not in s
    assert main(["bench", "--only", "nope", "--dry-run"]) == 2
    capsys.readouterr()
    for t in ("0", "-5", "nan"):  # every script was killed at once and reported as a timeout
        assert main(["bench", "--preset", "cpu", "--dry-run", "--timeout", t]) == 2
        assert "--timeout: expected seconds > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_e2e_tiny_run_writes_matching_stock_and_patched_rows(tmp_path):
    """Two layers, MNTP 2 x 16 and SimCSE 4 x 16, one timed step each, in fresh subprocesses."""
    cmd = [sys.executable, os.path.join(BENCH, "bench_e2e.py"), "--device", "cpu", "--preset", "cpu", "--layers", "2",
           "--tasks", "mntp,simcse", "--mntp-shape", "2x16", "--simcse-shape", "4x16", "--ckpt", "off", "--steps", "1",
           "--warmup", "1",
           "--out-dir", str(tmp_path), "--profile", str(tmp_path / "profile.txt")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    prof = (tmp_path / "profile.txt").read_text()  # one profiled step per provider and task
    heads = [line for line in prof.splitlines() if line.startswith("=== ")]
    assert len(heads) == 4 and all("aten ops" in h and "wall" in h for h in heads), heads
    assert "aten::mm" in prof
    rows = [json.loads(l) for l in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    got = {(row["task"], row["provider"]): row for row in rows}
    assert set(got) == {("mntp", "stock"), ("mntp", "patched"), ("simcse", "stock"), ("simcse", "patched")}
    for task in ("mntp", "simcse"):
        s, f = got[(task, "stock")], got[(task, "patched")]
        for row in (s, f):
            assert row["ms"] > 0 and row["peak_mem_mb"] > 0 and row["tokens_per_s"] > 0
            assert row["device"].startswith("cpu") and row["git"] and row["torch"]
            assert row["config"] == "smollm2-135m-2L"
        # same seed, weights and data: the first losses agree (dropout off for that forward)
        assert abs(f["loss0"] - s["loss0"]) < 1e-4 * max(1.0, abs(s["loss0"])), (task, f["loss0"], s["loss0"])
        assert f["speedup_vs_stock"] == pytest.approx(s["ms"] / f["ms"])
    assert got[("mntp", "stock")]["tokens"] == 2 * 16



@pytest.mark.slow
def test_e2e_packed_rows_match_the_padded_ones(tmp_path):
    """``mntp_text`` (texts of varied lengths) and SimCSE with the padded and the packed patched
    providers: the same first-step loss (the same texts, labels and weights; packing changes
    what is computed, not the result) on the same real tokens."""
    cmd = [sys.executable, os.path.join(BENCH, "bench_e2e.py"), "--device", "cpu", "--preset", "cpu", "--layers", "2",
           "--tasks", "mntp_text,simcse", "--providers", "patched,patched_packed", "--mntp-shape", "4x24",
           "--simcse-shape", "2x8", "--ckpt", "off", "--steps", "1", "--warmup", "0", "--out-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = [json.loads(l) for l in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    got = {(row["task"], row["provider"]): row for row in rows}
    assert set(got) == {(t, p) for t in ("mntp_text", "simcse") for p in ("patched", "patched_packed")}
    for task, slots in (("mntp_text", 4 * 24), ("simcse", 2 * 2 * 8)):
        pad, pk = got[(task, "patched")], got[(task, "patched_packed")]
        assert pk["tokens"] == pad["tokens"] < slots, "the texts' lengths should vary"
        assert abs(pk["loss0"] - pad["loss0"]) < 1e-5 * max(1.0, abs(pad["loss0"])), (task, pk["loss0"], pad["loss0"])

def test_sweep_attention_tiles_parses_its_tiles(capsys):
    """The GPU-only tile sweep: every default tile parses to a config, bad specs are named
    errors, and without CUDA it says so (exit 2) instead of failing later."""
    import torch

    sys.path.insert(0, BENCH)
    try:
        import sweep_attention_tiles as sw
    finally:
        sys.path.remove(BENCH)
    for (kind, bd), tiles in sw.DEFAULT_TILES.items():
        assert kind in ("fwd", "dq", "dkdv", "dkdv_atomic") and bd in (64, 128)
        for spec in tiles.split(","):
            c = sw.parse_tile(spec)
            split = "split" if c.kwargs.get("SPLIT_M") else ""
            tma = "tma" if c.kwargs.get("TMA") else ""
            assert f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}{split}{tma}" == spec
    assert "split" in sw.DEFAULT_TILES["dkdv", 128] and sw.parse_tile("64x128w8s1split").kwargs["SPLIT_M"] is True
    for kind in ("fwd", "dq", "dkdv"):
        assert "tma" in sw.DEFAULT_TILES[kind, 128] and "tma" in sw.DEFAULT_TILES[kind, 64]
    assert sw.parse_tile("128x128w8s3tma").kwargs["TMA"] is True
    with pytest.raises(ValueError, match="--tiles"):
        sw.parse_tile("64x64")
    # --layout: dense has no mask; padded is right padding (first sequence full, lengths >= 0.3 S);
    # holes masks tokens inside the spans too
    assert sw.layout_mask("dense", 4, 50) is None
    pad, holes = sw.layout_mask("padded", 6, 50), sw.layout_mask("holes", 6, 50)
    lens = pad.sum(1)
    assert pad.shape == (6, 50) and lens[0] == 50 and (lens >= 15).all() and (lens < 50).any()
    assert torch.equal(pad, torch.arange(50)[None, :] < lens[:, None])  # a prefix per row: no holes
    assert (holes <= pad).all() and not holes[0, 4] and holes[0, 5] and holes.sum() < pad.sum()
    r = subprocess.run([sys.executable, os.path.join(BENCH, "sweep_attention_tiles.py"), "--d", "128"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 2 and "CUDA" in r.stderr
    # bad arguments are refused by name before anything runs
    for bad, name in ((["--b", "0"], "--b"), (["--s", "x"], "--s"), (["--d", "100"], "--d"),
                      (["--kinds", "dkdv,bwd"], "--kinds"), (["--tiles", "64x64"], "--tiles"),
                      (["--set", "dq=64"], "--set"), (["--set", "bwd=64x64w4s2"], "--set")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            sw.main(bad)
        assert e.value.code == 2 and name in capsys.readouterr().err, bad
    r = subprocess.run([sys.executable, os.path.join(BENCH, "sweep_attention_tiles.py"), "--rep", "-1"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 2 and "--rep" in r.stderr and "CUDA" not in r.stderr


def test_kernel_times_ranks_what_a_step_spends():
    """The per-kernel breakdown benchmark rows carry (CPU operators here, device kernels on CUDA):
    a step of one large and one small matmul lists the large one first, ``match`` filters,
    and ``(all kernels)`` (first) sums every one seen, listed or not."""
    import torch

    common = _load("common")
    # the large matmul ~10 ms on a CPU core, so a loaded machine's preemption of a small op
    # (2.5 ms seen under pytest -n 2) does not reorder them
    a, b = torch.randn(768, 768), torch.randn(16, 16)
    t = common.kernel_times(lambda: (a @ a, b @ b, a.sum()), iters=3, device="cpu", top=2)
    assert next(iter(t)) == "(all kernels)", t
    total = t.pop("(all kernels)")
    assert t and len(t) <= 2 and all(v > 0 for v in t.values())
    assert next(iter(t)) in ("aten::mm", "aten::matmul"), t
    assert total >= sum(t.values()) - 1e-3, (total, t)
    full = common.kernel_times(lambda: (a @ a, b @ b, a.sum()), iters=3, device="cpu", top=50)
    assert len(full) > len(t) + 1  # top=2 left some out, and the total still counted them
    only = common.kernel_times(lambda: (a @ a, a.sum()), iters=2, device="cpu", match="sum")
    assert only.pop("(all kernels)") > 0
    assert only and all("sum" in k for k in only), only


def test_idle_gaps_of_a_call():
    """The idle accounting behind ``device_gaps``: overlapping activities count once, the wait
    before the first one is a gap named after the call's start, gaps are ranked and named by
    their neighbours, activities ending before the call are ignored."""
    common = _load("common")
    acts = [(5, 10, "a"), (8, 12, "b"), (20, 25, "c"), (21, 22, "d"), (30, 31, "e"), (-9, -1, "old")]
    r = common.idle_gaps((0, 40), acts, top=2)
    assert (r["span_us"], r["busy_us"], r["idle_us"]) == (31, 13, 18), r
    assert r["gaps"] == [{"us": 8, "after": "b", "before": "c"}, {"us": 5, "after": "(call start)", "before": "a"}], r
    assert common.idle_gaps((0, 1), [])["idle_us"] == 0.0


def test_device_gaps_finds_the_host_wait():
    """A step that keeps the host busy (a sleep) between two operators: the profiler plumbing
    finds that gap, between those two operators, as the longest (CPU operators stand in for
    device kernels here)."""
    import time

    import torch

    common = _load("common")
    a = torch.randn(64, 64)

    def step():
        torch.mm(a, a)
        time.sleep(0.02)
        a.sum()

    r = common.device_gaps(step, iters=2, device="cpu")
    g = r["gaps"][0]
    assert g["us"] >= 19000 and g["after"] == "aten::mm" and g["before"] == "aten::sum", r
    assert r["idle_us"] >= 19000 and r["idle_us_mean"] >= 19000 and r["busy_us"] > 0, r
    assert r["span_us"] >= r["idle_us"] + r["busy_us"] - 1, r


def test_kernel_times_and_gaps_from_one_profile(monkeypatch):
    """The bench rows' pair from one profiler session: the same ranking as kernel_times (the
    call ranges are not kernels) and the same gap as device_gaps; a profiler failure makes
    both ``{"error"}`` and does not raise."""
    import time

    import torch

    common = _load("common")
    a, b = torch.randn(768, 768), torch.randn(16, 16)

    def step():
        a @ a
        time.sleep(0.02)
        b.sum()

    kms, gaps = common.kernel_times_and_gaps(step, iters=2, top=5, device="cpu")
    assert next(iter(kms)) == "(all kernels)" and not any(k.startswith("device_gaps_call") for k in kms), kms
    assert list(kms)[1] in ("aten::mm", "aten::matmul"), kms
    assert gaps["gaps"][0]["us"] >= 19000 and gaps["gaps"][0]["before"] == "aten::sum", gaps
    monkeypatch.setattr(common, "_profile_calls", lambda *a: 1 / 0)
    assert common.kernel_times_and_gaps(step, device="cpu") == ({"error": "ZeroDivisionError: division by zero"},) * 2


def test_bench_counts_cpu_peak_memory():
    """CPU rows carry the peak the allocator saw above what was live before the call: two
    buffers alive together count twice, one freed before the next does not."""
    import torch

    common = _load("common")

    def together():
        a = torch.empty(4 << 20, dtype=torch.uint8)
        b = torch.empty(1 << 20, dtype=torch.uint8)
        return a, b

    def in_turn():
        a = torch.empty(4 << 20, dtype=torch.uint8)
        del a
        b = torch.empty(1 << 20, dtype=torch.uint8)
        return b

    assert common.bench(together, "cpu", warmup=1, rep=2)["peak_mem_mb"] == pytest.approx(5.0, abs=0.05)
    assert common.bench(in_turn, "cpu", warmup=1, rep=2)["peak_mem_mb"] == pytest.approx(4.0, abs=0.05)


def _one_call(fn, device, **kw):
    """common.bench for plumbing tests: one untimed call, fixed figures (no timing here)."""
    fn()
    return {"ms": 1.0, "ms_p20": 1.0, "ms_p80": 1.0, "peak_mem_mb": 0.0}


def test_attention_bench_providers_agree_on_the_smoke_case():
    """Every provider the GPU run times on padded batches computes the same attention as the
    reference (valid query rows), so no peer is timed on a different computation; ours runs
    interpreted."""
    import torch

    ba = _load("bench_attention")
    case = ba.cases_for("smoke")[0]
    torch.manual_seed(0)
    q, k, v, mask, cu, idx = ba._inputs(case, "cpu", torch.float32, requires_grad=False)
    want = ba.make_provider("reference", case, q, k, v, mask, cu, idx)()
    valid = mask.reshape(-1)
    for name in ("ours", "ours-holes", "ours-gridorder", "ours-varlen", "hf-sdpa", "sdpa-math"):
        got = ba.make_provider(name, case, q, k, v, mask, cu, idx)()
        if name == "ours-varlen":  # (T, H, D): the valid tokens in batch order
            full = torch.zeros(case["B"] * case["S"], case["H"], case["D"])
            full[idx] = got.float()
            got = full
        if name.startswith("sdpa-"):  # SDPA's own (B, H, S, D); the peer times no copy back
            got = got.transpose(1, 2)
        got = got.reshape(-1, case["H"], case["D"]).float()
        err = (got[valid] - want.reshape(-1, case["H"], case["D"])[valid].float()).abs().max().item()
        assert err < 1e-4, (name, err)


def test_attention_bench_runs_every_provider_on_cpu(tmp_path, monkeypatch):
    """The smoke preset through main(): a row for every provider and mode the padded GPU case
    times, each with the tiles ours launched; the switches it flips are restored."""
    ba = _load("bench_attention")
    monkeypatch.setattr(ba, "bench", _one_call)
    assert ba.main(["--device", "cpu", "--preset", "smoke", "--dtype", "fp16", "--out-dir", str(tmp_path)]) == 0
    rows = [json.loads(l) for l in (tmp_path / "attention.jsonl").read_text().splitlines()]
    got = {(r["provider"], r["mode"]): r for r in rows}
    for p in ("ours", "ours-holes", "ours-gridorder", "ours-varlen", "hf-sdpa", "reference"):
        for mode in ("fwd", "bwd", "full"):
            assert (p, mode) in got, (p, mode, sorted(got))
    assert ("ours-atomic", "bwd") in got and ("ours-atomic", "fwd") not in got
    assert "dkdv_atomic" in got["ours-atomic", "bwd"]["tiles"] and "dq" in got["ours", "bwd"]["tiles"]
    assert all(r["device"].startswith("cpu") and r["valid_tokens"] == 72 for r in rows)
    from llm2vec_fast.kernels.triton import attention as tk

    assert tk.LONGEST_FIRST and "LLM2VEC_FAST_ATTN_BWD" not in os.environ
    # ours-notma (on the GPU run's D = 128 cases from S = 2048): the pointer tiles only, beside
    # ours with the TMA tiles (forced here, where the interpreter runs them)
    assert "ours-notma" in ba.default_providers(ba._case("padded", 2, 2048, 4, 2, 128, [2048, 900]), "cuda")
    assert "ours-notma" not in ba.default_providers(ba._case("unpadded", 2, 512, 4, 4, 128), "cuda")
    import torch

    monkeypatch.setattr(tk, "_FORCE_TMA", True)
    case = ba.cases_for("smoke")[0]
    ours, notma = (ba.run_one(p, case, "full", "cpu", torch.float16) for p in ("ours", "ours-notma"))
    assert all(t.endswith("tma") for t in ours["tiles"].values()), ours["tiles"]
    assert not any(t.endswith("tma") for t in notma["tiles"].values()), notma["tiles"]
    assert "LLM2VEC_FAST_ATTN_TMA" not in os.environ


def test_masked_ce_bench_runs_every_provider_on_cpu(tmp_path, monkeypatch):
    """The smoke preset through main(): every strategy provider of the GPU run (the forced ones
    with a module switch off restore it), with and without d weight, in every mode, without error."""
    sys.path.insert(0, BENCH)
    import common

    from llm2vec_fast.kernels.triton import masked_ce as mce

    monkeypatch.setattr(common, "bench", _one_call)
    bm = _load("bench_masked_ce")
    flags = {flag: getattr(mce, flag) for _, flag in bm.FLAG_OFF.values()}
    assert bm.main(["--device", "cpu", "--preset", "smoke", "--out-dir", str(tmp_path)]) == 0
    rows = [json.loads(l) for l in (tmp_path / "masked_ce.jsonl").read_text().splitlines()]
    want = [p for p in bm.PRESETS["gpu-quick"]["providers"] if p == "ours" or p.startswith("strategy-")] + ["torch_full"]
    for p in want:
        for w_grad in (True, False):
            for mode in ("fwd", "bwd", "full"):
                r = [r for r in rows if (r["provider"], r["w_grad"], r["mode"]) == (p, w_grad, mode)]
                assert len(r) == 1 and "error" not in r[0] and r[0]["ms"] == 1.0, (p, w_grad, mode, r)
    assert {flag: getattr(mce, flag) for flag in flags} == flags


@pytest.mark.parametrize("script, argv", [
    ("bench_attention", ["--device", "cpu", "--preset", "cpu", "--modes", "fw"]),
    ("bench_attention", ["--device", "cpu", "--preset", "cpu", "--modes", ","]),
    ("bench_attention", ["--device", "cpu", "--preset", "cpu", "--providers", "bogus"]),
    ("bench_info_nce", ["--device", "cpu", "--preset", "cpu", "--providers", "ours"]),
    ("bench_masked_ce", ["--device", "cpu", "--preset", "cpu", "--providers", "strategy-auto"]),
    ("bench_encode", ["--device", "cpu", "--preset", "cpu", "--n-texts", "4", "--reps", "0"]),
    ("bench_encode", ["--device", "cpu", "--preset", "cpu", "--batch-size", "0"]),
    ("bench_e2e", ["--device", "cpu", "--preset", "cpu", "--steps", "0"]),
    ("bench_e2e", ["--device", "cpu", "--preset", "cpu", "--warmup", "-1"]),
    ("bench_e2e", ["--device", "cpu", "--preset", "cpu", "--tasks", "mntp,nope"]),
    ("bench_e2e", ["--device", "cpu", "--preset", "cpu", "--providers", "stock,bogus"]),
    ("bench_e2e", ["--device", "cpu", "--preset", "cpu", "--mntp-shape", "8x"]),
    ("compare_original_encode", ["--configs", "fast:float16", "--no-record"]),
    ("compare_original_encode", ["--rounds", "0", "--no-record"]),
])
def test_bench_scripts_refuse_bad_option_values_at_parse_time(tmp_path, capsys, script, argv):
    """argparse's one-line error and status 2, before anything runs or is written (the
    values used to print "unsupported" rows and exit 0, or end in a StatisticsError)."""
    mod = _load(script)
    out = tmp_path / "res"
    with pytest.raises(SystemExit) as e:
        mod.main([*argv, "--out-dir", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    bad = [a for a in argv if a.startswith("--") and a not in ("--device", "--preset", "--no-record")][-1]
    assert f": error: argument {bad}: expected " in err[-1], err
    assert not out.exists()


def _e2e_row(provider, threads):
    return dict(bench="e2e", config="smollm2-135m-1L", task="simcse", provider=provider, batch=2, seq=16, tokens=64,
                threads=threads, steps=1, ms=10.0, ms_p20=10.0, ms_p80=10.0, cpu_ms=20.0, tokens_per_s=6400.0,
                loss0=1.0, peak_mem_mb=100.0, step_mem_mb=10.0, mem_kind="peak_rss_subprocess")


def test_e2e_rows_name_the_workers_thread_count(tmp_path, monkeypatch):
    """The workers run with the preset's threads (2 on the CPU): the rows' device string says
    so, whatever the driver's own count (1 under OMP_NUM_THREADS=1)."""
    import torch

    sys.path.insert(0, BENCH)
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path / "results"))  # never the repository's
    be = _load("bench_e2e")
    monkeypatch.setattr(be, "run_pair", lambda args, config, task, B, T, ckpt, p, providers:
                        [_e2e_row(prov, p["threads"]) for prov in providers])
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert be.main(["--device", "cpu", "--preset", "cpu", "--tasks", "simcse", "--out-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(old)
    rows = [json.loads(l) for l in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and be.PRESETS["cpu"]["threads"] == 2
    assert all(r["threads"] == 2 and r["device"].endswith(" x2 threads") for r in rows), [r["device"] for r in rows]


def test_compare_original_encode_rows_name_the_workers_thread_count(tmp_path, monkeypatch):
    """Rows recorded by the driver (or from a log) carry the workers' --threads in the device
    string, and go to --out-dir."""
    import argparse

    import torch

    sys.path.insert(0, BENCH)
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path / "results"))  # never the repository's
    co = _load("compare_original_encode")
    runs = [dict(impl=impl, dtype="float32", n_texts=4, encode_s=1.0, texts_per_s=4.0, cpu_s=2.0, texts_per_cpu_s=2.0,
                 load_s=1.0, threads=3, batch_size=2, round=0, stsb_test_spearman_x100=50.0, wall_s=2.0)
           for impl in ("original", "fast")]
    args = argparse.Namespace(threads=3, batch_size=2, rounds=1, limit=2, no_record=False, out_dir=str(tmp_path / "out"))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        co.record(runs, [("original", "float32"), ("fast", "float32")], args)
    finally:
        torch.set_num_threads(old)
    rows = [json.loads(l) for l in (tmp_path / "out" / "encode_vs_original.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["run", "run", "summary"]
    assert all(r["device"].endswith(" x3 threads") and r["threads"] == 3 for r in rows), [r["device"] for r in rows]
    assert not (tmp_path / "results").exists()


def test_a_bench_run_that_measures_nothing_fails(tmp_path):
    """Every selected provider unsupported on every case: no rows, and exit status 1 (it was 0,
    so gpu_check.sh counted a run that measured nothing as a success)."""
    att = _load("bench_attention")
    assert att.main(["--device", "cpu", "--preset", "cpu", "--providers", "flex", "--out-dir", str(tmp_path)]) == 1
    out = tmp_path / "attention.jsonl"
    assert not out.exists() or not out.read_text().strip()
    if importlib.util.find_spec("liger_kernel") is None:
        mce = _load("bench_masked_ce")
        assert mce.main(["--device", "cpu", "--preset", "cpu", "--providers", "liger", "--out-dir",
                         str(tmp_path)]) == 1


def test_git_stamp_follows_the_override(monkeypatch):
    """Rows carry LLM2VEC_FAST_GIT_REV when it is set (a device call whose copy of .git lags
    the tree it runs), else the checkout's HEAD."""
    common = _load("common")
    monkeypatch.setenv("LLM2VEC_FAST_GIT_REV", "abc1234")
    assert common.git_sha() == "abc1234" and common.context("cpu")["git"] == "abc1234"
    monkeypatch.delenv("LLM2VEC_FAST_GIT_REV")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert common.git_sha() == (head or "unknown")

"""End-to-end training steps: stock transformers (as the original llm2vec runs it) against patched.

One MNTP step and one SimCSE step (forward, backward, optimizer) of Llama-shaped models built
from configs with random weights, LoRA r = 16 (alpha 32, dropout 0.05) on q, k, v, o, gate,
up, down, AdamW on the adapter:

- ``stock`` MNTP: ``AutoModelForCausalLM`` with SDPA, a non-causal (B, 1, T, T) padding mask
  (what llm2vec builds for its bidirectional models) and ``labels``: transformers computes the
  full ``(B, T, V)`` logits and the shifted cross-entropy.
- ``patched`` MNTP: the same model after ``patch_model(model, mntp=True)``: bidirectional
  attention on unpadded tokens, the loss through ``masked_linear_cross_entropy`` on the
  labelled rows only (no full logits), and patch_model's default ``fuse_lora="auto"``: on
  the CPU LoRA projections, gated MLPs and RMSNorms through the memory-lean autograd
  functions of ``llm2vec_fast.hf.lora`` (LoRA dropout as sparse dropped positions), on CUDA
  peft's own modules.
- optional (``--providers stock,patched,patched_nofuse,patched_fuse,patched_packed``):
  ``patched_nofuse`` (``fuse_lora=False``) and ``patched_fuse`` (``fuse_lora=True``, the fusion
  on CUDA too), to attribute the gain between the kernels and the fusion; ``patched_packed``:
  the padding-free batch ``--packing`` trains on, the texts one after another in one row with
  restarting positions, no padding computed (SimCSE: each view's row pooled by text offsets).
- ``mntp_text`` MNTP task: one text per row (``group_texts`` off) with lengths uniform in
  ``[0.3 T, T]``, where padding costs what packing saves; ``mntp`` rows are full-length.
- ``stock`` SimCSE: ``AutoModel`` with SDPA and the padding mask, the batch twice (dropout
  makes the two views), mean pooling by a Python loop over the batch, cosine similarity x 20,
  cross-entropy against ``arange(B)``.
- ``patched`` SimCSE: ``patch_model(model)`` and ``pooled_info_nce`` on the two views.

Every (config, task, provider) runs in a fresh subprocess, so on the CPU its peak resident
memory (``ru_maxrss``) belongs to that provider alone; on CUDA peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (weights included; ``step_mem_mb`` is
the part above what was allocated before the step). Both providers of a pair run from the same
seed on the same data, so their first-step losses must agree (``loss0`` in the rows).

On the CPU, ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment makes peak RSS follow the live
tensors instead of including glibc's retained blocks (rows then carry ``malloc_mmap_threshold``).

Tokens per second count the non-padding tokens that go through the model in one step
(SimCSE: both views).

    python benchmarks/bench_e2e.py --preset cpu --device cpu
    python benchmarks/bench_e2e.py --preset gpu-quick --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# patched providers -> patch_model's fuse_lora
PATCHED = {"patched": "auto", "patched_nofuse": False, "patched_fuse": True, "patched_packed": "auto"}
TASKS = ("mntp", "mntp_text", "simcse")
MNTP_TASKS = ("mntp", "mntp_text")

# Llama-shaped configs with random weights. SmolLM2-135M's is copied from its config.json
# (the GGUF holds the same numbers); the 1B class is Llama-3.2-1B's shape and the 7B class
# Mistral-7B-v0.1's.
CONFIGS = {
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    "llama-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    "mistral-7b": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, max_position_embeddings=8192, sliding_window=None,
    ),
}

# Per preset: the cases (config, task, batch B x T, gradient checkpointing for both providers),
# dtype, warmup and timed steps. The CPU MNTP case is fixed by the issue (SmolLM2-135M, 8 x 128,
# fp32, 2 threads); it runs without gradient checkpointing (the case) and with it (the
# original recipe's setting, where the full logits dominate what the stock step adds).
PRESETS = {
    "cpu": dict(
        cases=[
            ("smollm2-135m", "mntp", (8, 128), False),
            ("smollm2-135m", "mntp", (8, 128), True),
            ("smollm2-135m", "mntp_text", (8, 128), False),
            ("smollm2-135m", "simcse", (16, 64), False),
        ],
        dtype="float32", warmup=1, steps=3, threads=2,
    ),
    "gpu-quick": dict(
        cases=[("llama-1b", "mntp", (8, 512), True), ("llama-1b", "mntp_text", (8, 512), True),
               ("llama-1b", "simcse", (64, 128), True)],
        dtype="bfloat16", warmup=2, steps=5, threads=None,
    ),
    "gpu-full": dict(
        cases=[
            ("llama-1b", "mntp", (32, 512), True),
            ("llama-1b", "simcse", (128, 128), True),
            ("mistral-7b", "mntp", (32, 512), True),
            ("mistral-7b", "simcse", (128, 128), True),
        ],
        dtype="bfloat16", warmup=2, steps=8, threads=None,
    ),
}


# --------------------------------------------------------------------------------------
# Worker: one (config, task, provider) in this process
# --------------------------------------------------------------------------------------

def make_config(name: str, layers: int | None, attn_dropout: float):
    from transformers import AutoConfig

    kw = dict(CONFIGS[name])
    mt = kw.pop("model_type")
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(mt, **kw)
    cfg.attention_dropout = attn_dropout
    return cfg


def make_batch(task: str, B: int, T: int, V: int, device, seed: int):
    """Random token ids, right-padded. ``mntp``: full-length sequences (grouped text), 20% of
    tokens labelled, never a row's first (as the collator: nothing predicts it; 80/10/10 is
    irrelevant to speed, selected ids are kept). ``mntp_text`` and SimCSE: lengths uniform in
    [0.3 T, T], the longest exactly T."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    if task == "mntp":
        lens = torch.full((B,), T)
    else:
        lens = torch.randint(max(1, int(0.3 * T)), T + 1, (B,), generator=g)
        lens[0] = T
    mask = (torch.arange(T)[None, :] < lens[:, None]).long()
    labels = None
    if task in MNTP_TASKS:
        sel = (torch.rand(B, T, generator=g) < 0.2) & mask.bool()
        sel[:, 0] = False
        labels = torch.where(sel, ids, torch.full_like(ids, -100))
    ids = ids * mask  # pad id 0 on padding
    out = dict(input_ids=ids.to(device), attention_mask=mask.to(device))
    if labels is not None:
        out["labels"] = labels.to(device)
    return out, int(mask.sum())


def padding_mask_4d(mask2d):
    """(B, T) -> (B, 1, T, T) bool, every query sees every real key: llm2vec's non-causal mask.
    Padded query rows also see the real keys, so no row is fully masked (no NaN)."""
    B, T = mask2d.shape
    return mask2d.bool()[:, None, None, :].expand(B, 1, T, T)


def mean_pool_loop(hidden, mask2d):
    """The original package's pooling: one Python iteration per text."""
    import torch

    embs = []
    for i in range(hidden.shape[0]):
        n = int(mask2d[i].sum())
        embs.append(hidden[i, :n].mean(dim=0))
    return torch.stack(embs)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KB


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def worker(a) -> dict:
    import torch
    import torch.nn.functional as F

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    cuda = dev.type == "cuda"

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    cfg = make_config(a.config, a.layers, a.attn_dropout)
    mntp = a.task in MNTP_TASKS
    cls = AutoModelForCausalLM if mntp else AutoModel
    with dev:
        model = cls.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    if a.provider in PATCHED:
        from llm2vec_fast import patch_model

        fuse = PATCHED[a.provider]
        model = patch_model(model, mntp=mntp, fuse_lora=fuse)
    if a.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5 if mntp else 3e-5)

    B, T = a.batch, a.seq
    batch, ntok = make_batch(a.task, B, T, cfg.vocab_size, dev, a.seed + 1)
    mask2d = batch["attention_mask"]

    if mntp:
        # the label count MNTPCollator hands the loss (counted on the host as it draws the
        # labels), so the patched loss runs without a host sync, as in training
        n_lab = int((batch["labels"] != -100).sum())
        if a.provider == "stock":
            kw = dict(input_ids=batch["input_ids"], attention_mask=padding_mask_4d(mask2d), labels=batch["labels"])
        elif a.provider == "patched_packed":  # what MNTPCollator(packed=True) makes
            from llm2vec_fast.training.collators import pack_rows

            kw = pack_rows(mask2d, input_ids=batch["input_ids"], labels=batch["labels"]) | {"num_labelled": n_lab}
        else:  # the padded patched providers
            kw = dict(input_ids=batch["input_ids"], attention_mask=mask2d, labels=batch["labels"], num_labelled=n_lab)

        def loss_fn(scale=None):
            return model(**kw).loss
    else:
        ntok *= 2  # two views per step
        labels = torch.arange(B, device=dev)
        if a.provider == "stock":
            m4 = padding_mask_4d(mask2d)

            def loss_fn(scale=20.0):
                h1 = model(input_ids=batch["input_ids"], attention_mask=m4).last_hidden_state
                h2 = model(input_ids=batch["input_ids"], attention_mask=m4).last_hidden_state
                e1 = F.normalize(mean_pool_loop(h1, mask2d), dim=-1)
                e2 = F.normalize(mean_pool_loop(h2, mask2d), dim=-1)
                return F.cross_entropy((e1 @ e2.t()).float() * scale, labels)
        elif a.provider == "patched_packed":  # what ContrastiveCollator(packed=True) makes
            from llm2vec_fast import pooled_info_nce
            from llm2vec_fast.training.collators import pack_rows

            kw = pack_rows(mask2d, input_ids=batch["input_ids"])
            cu = torch.zeros(B + 1, dtype=torch.int32, device=dev)
            cu[1:] = mask2d.sum(1).cumsum(0)

            def loss_fn(scale=20.0):
                h1 = model(**kw).last_hidden_state[0]
                h2 = model(**kw).last_hidden_state[0]
                return pooled_info_nce(h1, None, h2, None, cu_seqlens_q=cu, cu_seqlens_d=cu, temperature=1.0 / scale)
        else:
            from llm2vec_fast import pooled_info_nce

            def loss_fn(scale=20.0):
                h1 = model(input_ids=batch["input_ids"], attention_mask=mask2d).last_hidden_state
                h2 = model(input_ids=batch["input_ids"], attention_mask=mask2d).last_hidden_state
                return pooled_info_nce(h1, mask2d, h2, mask2d, temperature=1.0 / scale)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # Commands from the driver on stdin, one per line: "setup" (loss check + warmup),
    # "step" (one timed step), "done" (print the row). The driver alternates the two
    # providers step by step, so a change in machine load hits both alike.
    times, cpu_times, loss0, rss_before, base = [], [], None, None, 0
    for cmd in sys.stdin:
        cmd = cmd.strip()
        if cmd == "setup":
            rss_before = current_rss_mb()
            # Same seed, weights and data for both providers: their first losses must agree.
            # Dropout draws differ between implementations, so this one forward runs in eval
            # (SimCSE at scale 1: at scale 20 two identical views give a loss of ~0, no check).
            model.eval()
            with torch.no_grad():
                loss0 = float(loss_fn(1.0))
            model.train()
            for _ in range(a.warmup):
                step()
            sync()
            if cuda:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            _reply("ready")
        elif cmd == "step":
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
            cpu_times.append((time.process_time() - c0) * 1e3)
            _reply(f"{times[-1]:.3f}")
        elif cmd.startswith("profile "):
            profile_step(step, sync, cuda, cmd[len("profile "):], f"{a.config} {a.task} {a.provider} {B}x{T}")
            _reply("profiled")
        elif cmd == "done":
            break
    ts = sorted(times)
    ms = statistics.median(ts)
    row = dict(
        bench="e2e", config=a.config + (f"-{a.layers}L" if a.layers else ""), task=a.task, provider=a.provider,
        batch=B, seq=T, tokens=ntok, dtype=a.dtype, grad_ckpt=bool(a.grad_ckpt), lora_r=16,
        attn_dropout=a.attn_dropout, threads=None if cuda else torch.get_num_threads(),
        steps=len(ts), ms=ms, ms_p20=ts[int(0.2 * (len(ts) - 1))], ms_p80=ts[int(0.8 * (len(ts) - 1))],
        cpu_ms=statistics.median(cpu_times), tokens_per_s=ntok / (ms / 1e3), loss0=loss0,
    )
    if not cuda and os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        # glibc keeps freed mid-size blocks mapped (its mmap threshold grows with use), so by
        # default peak RSS includes allocator retention; a fixed small threshold makes RSS
        # track the live tensors. Recorded, since it changes what the peak means.
        row["malloc_mmap_threshold"] = int(os.environ["MALLOC_MMAP_THRESHOLD_"])
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        row.update(peak_mem_mb=peak / 2**20, step_mem_mb=(peak - base) / 2**20, mem_kind="cuda_max_allocated")
    else:
        peak = peak_rss_mb()
        row.update(peak_mem_mb=peak, step_mem_mb=peak - rss_before, mem_kind="peak_rss_subprocess")
    return row


def profile_step(step, sync, cuda: bool, path: str, tag: str):
    """One more step under torch.profiler, summarised into ``path`` (appended): wall time, the
    device's busy time (sum of kernel times), counts of aten ops, kernel launches and
    host-device syncs, and the top host / device ops. Says where a step's time goes, in
    particular whether it is bound by the host's launches (device busy << wall)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        step()
        sync()
        wall = (time.perf_counter() - t0) * 1e3
    ev = prof.key_averages()
    busy = sum(e.self_device_time_total for e in ev if e.device_type.name == "CUDA") / 1e3 if cuda else 0.0
    n_aten = sum(e.count for e in ev if e.key.startswith("aten::"))
    n_launch = sum(e.count for e in ev if "LaunchKernel" in e.key or e.key in ("cuLaunchKernelEx", "cudaLaunchKernelExC"))
    syncs = {e.key: e.count for e in ev if any(w in e.key for w in (
        "Synchronize", "_local_scalar_dense", "aten::nonzero", "aten::item", "DtoH", "cudaMemcpy"))}
    lines = [
        f"=== {tag}: wall {wall:.1f} ms, device busy {busy:.1f} ms ({busy / wall:.0%}), {n_aten} aten ops, "
        f"{n_launch} kernel launches, syncs / copies {syncs}",
        ev.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60),
    ]
    if cuda:
        lines.append(ev.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(lines[0], file=sys.stderr, flush=True)


def _reply(msg: str):
    # The protocol goes over the real stdout; everything else the libraries print is on stderr.
    _PROTO.write("@@ " + msg + "\n")
    _PROTO.flush()


_PROTO = sys.stdout


# --------------------------------------------------------------------------------------
# Driver: one subprocess per (config, task, provider), ratios, rows
# --------------------------------------------------------------------------------------

class _Worker:
    """One provider's subprocess, driven line by line (see ``worker``)."""

    def __init__(self, args, config, task, provider, B, T, ckpt, p):
        import tempfile

        cmd = [
            sys.executable, os.path.abspath(__file__), "--worker", "--device", args.device, "--config", config,
            "--task", task, "--provider", provider, "--batch", str(B), "--seq", str(T), "--dtype", p["dtype"],
            "--warmup", str(args.warmup if args.warmup is not None else p["warmup"]), "--seed", str(args.seed),
            "--attn-dropout", str(args.attn_dropout),
        ]
        if ckpt:
            cmd.append("--grad-ckpt")
        if p["threads"]:
            cmd += ["--threads", str(p["threads"])]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        self.tag = f"{config} {task} {provider} {B}x{T}"
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)

    def ask(self, cmd: str) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return line[3:].strip()
        self.proc.wait()
        self.err.seek(0)
        raise RuntimeError(f"{self.tag}: worker exited (rc {self.proc.returncode}) during {cmd!r}\n{self.err.read()[-3000:]}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


def run_pair(args, config, task, B, T, ckpt, p, providers) -> list[dict]:
    """Set up each provider in turn, then time them alternately, step by step (ABBA order)."""
    steps = args.steps if args.steps is not None else p["steps"]
    workers, rows = [], []
    try:
        for prov in providers:
            t0 = time.time()
            w = _Worker(args, config, task, prov, B, T, ckpt, p)
            workers.append(w)
            w.ask("setup")  # one at a time: never two heavy set-ups together on a shared CPU
            print(f"[e2e] {w.tag}: set up in {time.time() - t0:.0f} s", flush=True)
        for i in range(steps):
            for w in (workers if i % 2 == 0 else workers[::-1]):
                w.ask("step")
        if getattr(args, "profile", None):
            for w in workers:
                w.ask(f"profile {os.path.abspath(args.profile)}")
        for w in workers:
            rows.append(json.loads(w.ask("done")))
    finally:
        for w in workers:
            w.close()
    for row in rows:
        print(
            f"[e2e] {config} {task} {row['provider']} {B}x{T}: {row['ms']:.1f} ms/step (p20 {row['ms_p20']:.1f}, "
            f"p80 {row['ms_p80']:.1f}; cpu {row['cpu_ms']:.0f} ms), {row['tokens_per_s']:.0f} tok/s, "
            f"peak {row['peak_mem_mb']:.0f} MB ({row['mem_kind']}), loss0 {row['loss0']:.7f}",
            flush=True,
        )
    return rows


def _dropout(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a float in [0, 1), got {text!r}")
    return v


def main(argv=None) -> int:
    from common import comma_list, device_arg, nonnegative_int, positive_int, shape_arg

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, type=device_arg, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--preset", default=None, choices=list(PRESETS), help="default: cpu on CPU, gpu-quick on CUDA")
    ap.add_argument("--out-dir", default=None, help="where e2e.jsonl goes (default benchmarks/results)")
    ap.add_argument("--tasks", default=list(TASKS), type=comma_list(TASKS),
                    help=f"comma-separated subset of {','.join(TASKS)}")
    ap.add_argument("--providers", default=["stock", "patched"], type=comma_list(("stock", *PATCHED)),
                    help=f"comma-separated subset of {','.join(('stock', *PATCHED))}")
    ap.add_argument("--configs", default=None, type=comma_list(CONFIGS),
                    help=f"comma list overriding the preset's configs ({','.join(CONFIGS)})")
    ap.add_argument("--layers", type=positive_int, default=None, help="override the number of layers (smoke tests)")
    ap.add_argument("--mntp-shape", default=None, type=shape_arg, help="BxT overriding the preset's MNTP batches")
    ap.add_argument("--simcse-shape", default=None, type=shape_arg, help="BxT overriding the preset's SimCSE batch")
    ap.add_argument("--warmup", type=nonnegative_int, default=None)
    ap.add_argument("--steps", type=positive_int, default=None, help="timed steps per provider")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn-dropout", type=_dropout, default=0.0,
                    help="attention dropout for both providers (the SimCSE recipe used 0.3; LoRA dropout "
                         "0.05 already makes the two views differ)")
    ap.add_argument("--ckpt", default="preset", choices=["preset", "on", "off"],
                    help="gradient checkpointing for both providers (default: each case's, from the preset)")
    ap.add_argument("--no-save", action="store_true", help="print rows, write nothing")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="after timing, profile one more step per provider (torch.profiler) and append a summary "
                         "to FILE: wall vs device-busy time, launches, syncs, top ops")
    # worker-only
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--provider", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=positive_int, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=positive_int, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--grad-ckpt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=positive_int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        global _PROTO
        _PROTO, sys.stdout = sys.stdout, sys.stderr  # stray library prints must not break the protocol
        _reply(json.dumps(worker(args)))
        return 0

    preset = args.preset or ("cpu" if args.device == "cpu" else "gpu-quick")
    p = PRESETS[preset]
    tasks = args.tasks
    cases = []
    for config, task, shape, ckpt in p["cases"]:
        if task not in tasks:
            continue
        override = args.mntp_shape if task in MNTP_TASKS else args.simcse_shape
        if override:
            shape = override
        if args.ckpt != "preset":
            ckpt = args.ckpt == "on"
        for c in (args.configs or [config]):
            if (c, task, shape, ckpt) not in cases:
                cases.append((c, task, shape, ckpt))

    n_rows, failed = 0, 0
    for config, task, (B, T), ckpt in cases:
        try:
            got = run_pair(args, config, task, B, T, ckpt, p, args.providers)
        except RuntimeError as e:
            print(f"[e2e] FAILED: {e}", file=sys.stderr, flush=True)
            failed += 1
            continue
        pair = {row["provider"]: dict(row, preset=preset) for row in got}
        for name in PATCHED:
            if "stock" not in pair or name not in pair:
                continue
            s, f = pair["stock"], pair[name]
            f["speedup_vs_stock"] = s["ms"] / f["ms"]
            f["mem_ratio_vs_stock"] = f["peak_mem_mb"] / s["peak_mem_mb"]
            f["step_mem_ratio_vs_stock"] = f["step_mem_mb"] / s["step_mem_mb"] if s["step_mem_mb"] > 0 else None
            f["loss0_diff_vs_stock"] = abs(f["loss0"] - s["loss0"])
            print(
                f"[e2e] {config} {task} {B}x{T} ckpt={ckpt}: {name}/stock time {f['ms'] / s['ms']:.2f}x "
                f"(cpu time {f['cpu_ms'] / s['cpu_ms']:.2f}x), peak memory {f['mem_ratio_vs_stock']:.2f}x "
                f"(above the loaded model {f['step_mem_mb']:.0f} / {s['step_mem_mb']:.0f} MB), "
                f"|loss0 diff| {f['loss0_diff_vs_stock']:.2e}",
                flush=True,
            )
        if pair and not args.no_save:
            # appended pair by pair: a run cut short by a timeout keeps what it finished
            from common import append_rows

            # The device string names the threads the workers ran with (their rows' threads:
            # the preset's), not this driver's count.
            by_threads = {}
            for row in pair.values():
                by_threads.setdefault(row.get("threads"), []).append(row)
            for threads, rs in by_threads.items():
                path = append_rows("e2e", rs, args.device, args.out_dir, threads=threads)
            n_rows += len(pair)
            print(f"[e2e] {len(pair)} rows -> {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

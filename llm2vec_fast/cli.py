"""The ``llm2vec-fast`` command line.

Each subcommand lives in its own module exposing ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports (transformers, triton) happen inside ``run``, so
``llm2vec-fast --help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "llm2vec_fast.commands.demo",
    "mntp": "llm2vec_fast.commands.train",
    "simcse": "llm2vec_fast.commands.train",
    "supervised": "llm2vec_fast.commands.train",
    "encode": "llm2vec_fast.commands.encode",
    "eval-sts": "llm2vec_fast.commands.eval_sts",
    "bench": "llm2vec_fast.commands.bench",
    "smoke": "llm2vec_fast.commands.smoke",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm2vec-fast", description="Turn decoder-only LLMs into fast text encoders (LLM2Vec)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue  # command not shipped in this build
            raise
        helps = getattr(mod, "HELPS", {})
        p = sub.add_parser(name, help=helps.get(name, mod.HELP), description=helps.get(name, mod.HELP))
        mod.add_arguments(p, name) if getattr(mod, "MULTI", False) else mod.add_arguments(p)
        p.set_defaults(_run=mod.run, command=name)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from llm2vec_fast.commands import UsageError

    try:
        return int(args._run(args) or 0)
    except UsageError as e:
        # One line and status 2, as argparse reports its own errors (the train commands
        # return 2 after printing theirs); raised on, so callers of main() see which option.
        print(f"llm2vec-fast {args.command}: error: {e}", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())

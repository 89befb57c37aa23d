"""Subcommands of the ``llm2vec-fast`` command line (see ``llm2vec_fast.cli``)."""

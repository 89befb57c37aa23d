"""Subcommands of the ``llm2vec-fast`` command line (see ``llm2vec_fast.cli``)."""
from __future__ import annotations


class UsageError(SystemExit):
    """A bad option value, found before any work where it can be: ``llm2vec-fast`` prints
    ``llm2vec-fast COMMAND: error: MESSAGE`` (one line, on stderr) and exits with status 2,
    as argparse does for the errors it finds itself. ``str(error)`` is the message, which
    names the option (``--output: ...``)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message

"""The ``declora`` command line: ``main`` parses argv and dispatches to one subcommand module."""

from declora.cli.app import main

__all__ = ["main"]

"""The errors a user can fix, one family: the CLI prints each as one line (``declora: error: ...``).

Exit codes (documented in the README): 2 for bad input found before training (config, data, paths,
an unreadable checkpoint named at resume), 1 for failures while running (divergence, a missing peer).
``declora --debug`` (or ``DECLORA_DEBUG=1``) shows the traceback instead of the one line.
"""

from __future__ import annotations


class DecloraError(Exception):
    """Base of every error a user can act on; its message names the option, file or peer and the fix."""

    exit_code: int = 2


class ConfigError(DecloraError, ValueError):
    """A configuration value is invalid; the message names the option and the fix."""


class DataError(DecloraError, ValueError):
    """A data file or dataset cannot serve the task (empty, bad labels, missing column); names the file."""


class CheckpointError(DecloraError):
    """A run directory or checkpoint cannot be used as asked (damaged, incomplete, another run's)."""


class DivergenceError(DecloraError):
    """Training produced a non-finite value; names the round, the client and the stage."""

    exit_code = 1


class PeerError(DecloraError, RuntimeError):
    """A peer is missing or sent something unusable; names the peer and the round."""

    exit_code = 1


def one_line(err: BaseException) -> str:
    """``declora: error: <message>`` on one line (a message's own line breaks become spaces)."""
    return "declora: error: " + " ".join(str(err).split())


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` anywhere on the command line, or ``DECLORA_DEBUG`` set to anything but 0/empty."""
    import os

    return "--debug" in argv or os.environ.get("DECLORA_DEBUG", "0") not in ("", "0")

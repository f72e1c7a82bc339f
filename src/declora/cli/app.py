"""The ``declora`` command line: the parser and :func:`main` (dispatch, one-line errors, exit codes, --debug).

The subcommands live by what they do: :mod:`declora.cli.train` (train, launch, peer, swarm),
:mod:`declora.cli.tools` (topology, partition, compare, reproduce) and :mod:`declora.cli.runs` (eval,
predict, export, generate). Each imports its heavy libraries inside the command, so ``declora --help``
stays fast.

Examples:
    declora train
    declora train --config recipes/default.yaml train.clients=10 topology.kind=ring train.rounds=20
    declora topology ring --clients 8 --mixing metropolis --plot ring.png
    declora compare runs/a runs/b --csv compare.csv --plot compare.png
    declora predict runs/x --text "a gorgeous film"
"""

from __future__ import annotations

import argparse
import os
import sys

from declora.errors import DecloraError, PeerError, debug_requested, one_line

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """``declora``'s parser: every subcommand with its flags (each sets ``func``, the command to run)."""
    from declora import __version__
    from declora.cli.runs import add_run_commands
    from declora.cli.tools import add_tool_commands
    from declora.cli.train import add_train_commands

    parser = argparse.ArgumentParser(prog="declora", description="Decentralized LoRA fine-tuning (Dec-LoRA).")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also DECLORA_DEBUG=1; any position)"
    )
    parser.add_argument("--version", action="version", version=f"declora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_commands(sub)  # eval, predict, export, generate
    add_train_commands(sub)  # train, launch, peer, swarm
    add_tool_commands(sub)  # topology, partition, compare, reproduce
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every :class:`DecloraError` is one line and its exit code (see declora.errors).

    ``--debug`` (anywhere on the line) or ``DECLORA_DEBUG=1`` shows the traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return args.func(args)
    except DecloraError as err:
        if debug:
            raise
        print(one_line(err), file=sys.stderr, flush=True)  # one line: what, where, the fix
        dist = sys.modules.get("torch.distributed")
        if isinstance(err, PeerError) or (dist is not None and dist.is_available() and dist.is_initialized()):
            sys.stdout.flush()
            os._exit(err.exit_code)  # not sys.exit: gloo threads still waiting on a peer would abort the exit
        return err.exit_code
    except KeyboardInterrupt:
        print("declora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

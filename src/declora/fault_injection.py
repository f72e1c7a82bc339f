"""Test-only fault injection: make the process that owns a given client crash or hang at a given round.

Set ``DECLORA_FAULT=<client>@<round>`` (crash: the process exits at once with code 17, without cleanup,
as a killed peer would) or ``DECLORA_FAULT=<client>@<round>:hang`` (the process stops answering).
The fault fires at the start of that round, before the local steps. Unset (the normal case) it does
nothing. It exists so the failure and resume tests can kill a peer at a precise point.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "DECLORA_FAULT"
EXIT_CODE = 17


def parse(spec: str) -> tuple[int, int, str]:
    """``"2@3"`` -> (client 2, round 3, "exit"); ``"2@3:hang"`` -> (2, 3, "hang")."""
    target, _, mode = spec.partition(":")
    client, _, round_ = target.partition("@")
    mode = mode or "exit"
    if mode not in ("exit", "hang") or not client.isdigit() or not round_.isdigit():
        raise ValueError(f"{ENV}={spec!r}: use <client>@<round> or <client>@<round>:hang")
    return int(client), int(round_), mode


def maybe_fail(local_clients: list[int], round_: int) -> None:
    """Crash or hang here if ``DECLORA_FAULT`` names one of ``local_clients`` and this round."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    client, at, mode = parse(spec)
    if client not in local_clients or round_ != at:
        return
    print(
        f"declora: {ENV}: client {client} {'hangs' if mode == 'hang' else 'crashes'} at round {at}",
        file=sys.stderr,
        flush=True,
    )
    if mode == "hang":
        while True:
            time.sleep(3600)
    os._exit(EXIT_CODE)

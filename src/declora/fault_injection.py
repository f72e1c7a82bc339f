"""Test-only fault injection: make the process that owns a given client crash or hang at a given round.

Set ``DECLORA_FAULT=<client>@<round>`` (crash: the process exits at once with code 17, without cleanup,
as a killed peer would) or ``DECLORA_FAULT=<client>@<round>:hang`` (the process stops answering).
The fault fires at the start of that round, before the local steps. Unset (the normal case) it does
nothing. It exists so the failure and resume tests can kill a peer at a precise point.

``DECLORA_POISON=<client>@<round>:nan|shape[,...]`` makes that client *send* a bad message in that
round (its own state stays good): NaN in its first tensor, or that tensor one element short (a
message of the wrong shape and size), as a faulty or malicious peer would. Used by runtime=swarm and
runtime=distributed; see :func:`poisoned`.

``DECLORA_ROUND_DELAY=<seconds>`` makes every round start with that long a sleep (a slower model
without the CPU cost), so the swarm tests can let a peer join or restart while the others are still
training.

``DECLORA_FAULT_CLOCK_SKEW_S=<client>:<seconds>[,...]`` (e.g. ``1:300,2:-300``) makes the process that
owns that client read a wall clock that far off: ``time.time`` and hivemind's ``get_dht_time`` in that
process only (:func:`skew_clock`), as a machine whose clock is wrong would (network namespaces share one
kernel clock, so a skew cannot be emulated otherwise). Monotonic clocks and the p2p daemon (a separate Go
process) keep the true time. Test-only, like everything here.
"""

from __future__ import annotations

import os
import sys
import time

import torch

ENV = "DECLORA_FAULT"
POISON_ENV = "DECLORA_POISON"
DELAY_ENV = "DECLORA_ROUND_DELAY"
SKEW_ENV = "DECLORA_FAULT_CLOCK_SKEW_S"
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
    """Crash or hang here if ``DECLORA_FAULT`` names one of ``local_clients`` and this round.

    Sleeps ``DECLORA_ROUND_DELAY`` seconds first, if set.
    """
    delay = os.environ.get(DELAY_ENV)
    if delay:
        time.sleep(float(delay))
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


def poisoned(message: dict[str, torch.Tensor], client: int, round_: int) -> dict[str, torch.Tensor]:
    """``message``, or its poisoned copy if ``DECLORA_POISON`` names ``client`` and ``round_``."""
    for spec in filter(None, os.environ.get(POISON_ENV, "").split(",")):
        target, _, kind = spec.partition(":")
        who, _, when = target.partition("@")
        if kind not in ("nan", "shape") or not who.isdigit() or not when.isdigit():
            raise ValueError(f"{POISON_ENV}={spec!r}: use <client>@<round>:nan or <client>@<round>:shape")
        if (int(who), int(when)) == (client, round_):
            name = sorted(message)[0]
            bad = torch.full_like(message[name], float("nan")) if kind == "nan" else message[name].reshape(-1)[:-1]
            return message | {name: bad}
    return message


def skew_clock(client: int) -> float:
    """Shift this process's wall clock if ``DECLORA_FAULT_CLOCK_SKEW_S`` names ``client``; returns the skew.

    Replaces ``time.time`` and every loaded hivemind module's ``get_dht_time`` that is the true clock
    (hivemind binds ``get_dht_time = time.time`` at import, and imports it by name into several modules).
    """
    skew = 0.0
    for spec in filter(None, os.environ.get(SKEW_ENV, "").split(",")):
        who, _, seconds = spec.partition(":")
        try:
            value = float(seconds)
        except ValueError:
            value = float("nan")
        if not who.strip().isdigit() or value != value or abs(value) == float("inf"):
            raise ValueError(f"{SKEW_ENV}={spec!r}: use <client>:<seconds>[,...], e.g. 1:300,2:-300")
        if int(who) == client:
            skew = value
    if skew == 0.0:
        return 0.0
    true_time = time.time

    def skewed() -> float:
        return true_time() + skew

    time.time = skewed
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "hivemind" and getattr(module, "get_dht_time", None) is true_time:
            module.get_dht_time = skewed
    print(f"declora: {SKEW_ENV}: client {client}'s clock is off by {skew:+g} s (test only)", file=sys.stderr)
    return skew

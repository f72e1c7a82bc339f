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

``DECLORA_FAULT_CLOCK_SKEW_S=<client>:<seconds>[@<round>][,...]`` (e.g. ``1:300,2:-300``) makes the
process that owns that client read a wall clock that far off: ``time.time`` and hivemind's ``get_dht_time``
in that process only (:func:`skew_clock`), as a machine whose clock is wrong would (network namespaces share
one kernel clock, so a skew cannot be emulated otherwise). With ``@<round>`` the clock is right at start and
*jumps* by that much when that round starts (``1:30@3``: a clock stepped after joining). Monotonic clocks and
the p2p daemon (a separate Go process) keep the true time. Test-only, like everything here.
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
_clock: dict = {"skew": 0.0, "jumps": {}}  # the skew in force now; round -> a jump due when it starts


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
    if round_ in _clock["jumps"]:
        _clock["skew"] += _clock["jumps"].pop(round_)
        print(f"declora: {SKEW_ENV}: the clock jumps to {_clock['skew']:+g} s at round {round_}", file=sys.stderr)
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
    """Shift this process's wall clock if ``DECLORA_FAULT_CLOCK_SKEW_S`` names ``client``; returns the skew at
    start (a jump ``@<round>`` is applied by :func:`maybe_fail` when that round starts).

    Replaces ``time.time`` and every loaded hivemind module's ``get_dht_time`` that is the true clock
    (hivemind binds ``get_dht_time = time.time`` at import, and imports it by name into several modules).
    """
    skew, jumps = 0.0, {}
    for spec in filter(None, os.environ.get(SKEW_ENV, "").split(",")):
        who, _, rest = spec.partition(":")
        seconds, _, at = rest.partition("@")
        try:
            value = float(seconds)
        except ValueError:
            value = float("nan")
        if not who.strip().isdigit() or value != value or abs(value) == float("inf") or (at and not at.isdigit()):
            raise ValueError(f"{SKEW_ENV}={spec!r}: use <client>:<seconds>[@<round>][,...], e.g. 1:300,2:-30@3")
        if int(who) == client:
            if at:
                jumps[int(at)] = value
            else:
                skew = value
    if skew == 0.0 and not jumps:
        return 0.0
    _clock.update(skew=skew, jumps=jumps)
    true_time = time.time

    def skewed() -> float:
        return true_time() + _clock["skew"]

    time.time = skewed
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "hivemind" and getattr(module, "get_dht_time", None) is true_time:
            module.get_dht_time = skewed
    later = "".join(f", {v:+g} s more at round {r}" for r, v in sorted(jumps.items()))
    print(f"declora: {SKEW_ENV}: client {client}'s clock is off by {skew:+g} s{later} (test only)", file=sys.stderr)
    return skew

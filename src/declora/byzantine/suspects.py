"""Naming the suspect: per receiving peer and neighbour, how often and how much the robust rule cut it.

A neighbour's message counts as *cut* in a round when clipped_gossip scaled it to half or less
(``1 - tau / ||x_j - x_i|| >= 0.5``), or when trimmed_mean/median dropped its value at least halfway from
chance to always (``Diagnostics.cut >= 0.5``: a median over 9 values drops every honest value on 8 of 9
coordinates by chance; a liar is dropped on all). The adaptive radius always clips the farthest neighbour a
little, and a trimmed mean drops some value of every neighbour on some coordinates: only heavy, repeated
cuts point at a liar.
A neighbour cut in at least :data:`NEED` of the last :data:`WINDOW` rounds is flagged: named once on
stderr (client id, and peer ID in the swarm) and listed in summary.json's ``suspects``. With
``comm.robust_exclude=true`` the peer stops mixing a flagged neighbour (:func:`declora.mixing.robust.exclude`).

The counts and flags go into every checkpoint (:meth:`Suspects.state_dict`, through
:func:`declora.byzantine.defense.checkpoint_state`): a resumed run continues the same windows, keeps
excluding the neighbours it flagged and does not name them again.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from declora.mixing.robust import Diagnostics

WINDOW = 5  # rounds looked back on
NEED = 3  # cut rounds among them that flag a neighbour
HEAVY = {"clipped_gossip": 0.5, "trimmed_mean": 0.5, "median": 0.5}  # the cut that counts, per rule


class Suspects:
    """Per (receiver i, neighbour j): rounds seen, rounds cut, the sum of cuts, and the last rounds' flags."""

    def __init__(self, rule: str, say: Callable[[str], None] | None = None) -> None:
        self.threshold = HEAVY.get(rule, 2.0)  # rule none: nothing is ever cut
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.recent: dict[tuple[int, int], deque[bool]] = {}
        self.seen: dict[tuple[int, int], int] = {}
        self.cut_rounds: dict[tuple[int, int], int] = {}
        self.cut_total: dict[tuple[int, int], float] = {}
        self.flagged: dict[int, set[int]] = {}

    def record(self, i: int, diag: Diagnostics, round_: int, who: Callable[[int], str] | None = None) -> None:
        """Add one mixing step of client i; flag (and name once) a neighbour cut in most recent rounds."""
        for j, cut in sorted(diag.cut.items()):
            key = (i, j)
            heavy = cut >= self.threshold
            window = self.recent.setdefault(key, deque(maxlen=WINDOW))
            window.append(heavy)
            self.seen[key] = self.seen.get(key, 0) + 1
            self.cut_rounds[key] = self.cut_rounds.get(key, 0) + int(heavy)
            self.cut_total[key] = self.cut_total.get(key, 0.0) + cut
            if sum(window) >= NEED and j not in self.flagged.setdefault(i, set()):
                self.flagged[i].add(j)
                named = who(j) if who is not None else ""
                name = f" ({named})" if named else ""
                self.say(
                    f"declora: client {i} suspects neighbour client {j}{name}: its messages were cut in "
                    f"{sum(window)} of the last {len(window)} rounds (round {round_}; this round it cut {cut:.0%})"
                )

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`record` accumulated, in plain lists (``torch.load(weights_only=True)`` reads them).

        ``pairs``: one ``[i, j, seen, cut_rounds, cut_total, recent window]`` per (receiver, neighbour);
        ``flagged``: receiver -> the neighbours it flagged.
        """
        pairs = [
            [i, j, self.seen[(i, j)], self.cut_rounds[(i, j)], self.cut_total[(i, j)], list(self.recent[(i, j)])]
            for (i, j) in sorted(self.seen)
        ]
        return {"pairs": pairs, "flagged": {i: sorted(js) for i, js in sorted(self.flagged.items())}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`'s output; None or ``{}`` (a checkpoint from before it was saved) = empty."""
        state = state or {}
        self.recent, self.seen, self.cut_rounds, self.cut_total = {}, {}, {}, {}
        for i, j, seen, cut_rounds, cut_total, recent in state.get("pairs", []):
            key = (int(i), int(j))
            self.seen[key], self.cut_rounds[key], self.cut_total[key] = int(seen), int(cut_rounds), float(cut_total)
            self.recent[key] = deque((bool(b) for b in recent), maxlen=WINDOW)
        self.flagged = {int(i): {int(j) for j in js} for i, js in state.get("flagged", {}).items()}

    def of(self, i: int) -> set[int]:
        """The neighbours client i has flagged."""
        return self.flagged.get(i, set())

    def table(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{receiver: {neighbour: {rounds, cut_rounds, mean_cut}}}`` for the neighbours ever cut heavily."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for (i, j), n in sorted(self.seen.items()):
            if self.cut_rounds[(i, j)]:
                out.setdefault(str(i), {})[str(j)] = {
                    "rounds": n,
                    "cut_rounds": self.cut_rounds[(i, j)],
                    "mean_cut": round(self.cut_total[(i, j)] / n, 4),
                }
        return out

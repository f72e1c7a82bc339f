"""Naming the suspect: per receiving peer and neighbour, how often and how much the robust rule cut it.

A neighbour's message counts as *cut* in a round when clipped_gossip scaled it to half or less
(``1 - tau / ||x_j - x_i|| >= 0.5``), or when trimmed_mean/median dropped its value on at least 90 % of the
coordinates. (The adaptive radius always clips the farthest neighbour a little, and a trimmed mean
drops some value of every neighbour on some coordinates: only heavy, repeated cuts point at a liar.)
A neighbour cut in at least :data:`NEED` of the last :data:`WINDOW` rounds is flagged: named once on
stderr (client id, and peer ID in the swarm) and listed in summary.json's ``suspects``. With
``comm.robust_exclude=true`` the peer stops mixing a flagged neighbour (:func:`declora.mixing.robust.exclude`).

The counts live in memory: a resumed run starts its window afresh.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable

from declora.mixing.robust import Diagnostics

WINDOW = 5  # rounds looked back on
NEED = 3  # cut rounds among them that flag a neighbour
HEAVY = {"clipped_gossip": 0.5, "trimmed_mean": 0.9, "median": 0.9}  # the cut that counts, per rule


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

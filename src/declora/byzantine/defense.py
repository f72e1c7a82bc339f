"""The gossip step's Byzantine hooks: attackers' messages out, the robust rule on what came in.

:class:`ByzantineGossip` is what :mod:`declora.algorithms.gossip` calls when ``comm.robust`` is not
``none`` or ``byzantine.peers`` is set (otherwise gossip runs exactly as before, without it):

- :meth:`ByzantineGossip.outgoing`: every local attacker's state is replaced by its attack
  (:class:`~declora.byzantine.adversary.Adversary`), before any quantization;
- :meth:`ByzantineGossip.mix`: client i's mixing step under ``comm.robust``
  (:func:`declora.mixing.robust.robust_mix`) on row i of W or W_t, after dropping the neighbours it has
  flagged when ``comm.robust_exclude=true``; what the rule cut is counted per neighbour
  (:class:`~declora.byzantine.suspects.Suspects`).

Each process applies these to its own clients, so the simulation, torchrun and the swarm (whose row is
W_t from :meth:`Communicator.round_matrix`) run the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from declora.byzantine.adversary import Adversary
from declora.byzantine.suspects import Suspects
from declora.mixing.robust import exclude, robust_mix
from declora.types import State


def peer_name(comm: Any, j: int) -> str:
    """How the log names client j: its peer ID in the swarm, nothing more elsewhere."""
    known = getattr(getattr(comm, "node", None), "known", None) or {}
    return f"peer {known[j]}" if j in known else ""


class ByzantineGossip:
    """``comm.robust*`` and ``byzantine.*`` for one process's clients."""

    def __init__(
        self,
        rule: str = "none",
        radius: float | None = None,
        trim: int = 1,
        exclude_flagged: bool = False,
        adversary: Adversary | None = None,
    ) -> None:
        self.rule, self.radius, self.trim = rule, radius, trim
        self.exclude_flagged = exclude_flagged
        self.adversary = adversary
        self.suspects = Suspects(rule)

    @classmethod
    def from_config(cls, cfg: Any) -> ByzantineGossip | None:
        """The hooks for a run's config; None when neither a rule nor an attacker is set (plain gossip)."""
        c, b = cfg.comm, cfg.byzantine
        if c.robust == "none" and not b.peers:
            return None
        adversary = Adversary(b, cfg.train.seed) if b.peers else None
        return cls(c.robust, c.robust_radius, c.robust_trim, c.robust_exclude, adversary)

    def outgoing(self, states: dict[int, State], W: np.ndarray, round_: int) -> dict[int, State]:
        """What the local clients send: their states, attackers' replaced by their attack."""
        return states if self.adversary is None else self.adversary.outgoing(states, W, round_)

    def observe(self, received: Mapping[int, Mapping[int, State]]) -> None:
        """Let local attackers remember what they received (their view next round outside the simulation)."""
        if self.adversary is not None:
            self.adversary.observe(received)

    def mix(self, comm: Any, W: np.ndarray, i: int, inbox: Mapping[int, State]) -> State:
        """Client i's robust mixing step over ``inbox`` (its own state included) with row i of ``W``."""
        flagged = self.suspects.of(i) if self.exclude_flagged else set()
        if flagged:
            W = exclude(W, i, flagged)
            inbox = {j: s for j, s in inbox.items() if j not in flagged}
        mixed, diag = robust_mix(self.rule, W, i, inbox, self.radius, self.trim)
        if self.rule != "none":
            self.suspects.record(i, diag, int(getattr(comm, "round", 0)), lambda j: peer_name(comm, j))
        return mixed

    def state_dict(self) -> dict[str, Any]:
        """What these hooks remember between rounds: the suspect counts and flags, and the attack memory."""
        out: dict[str, Any] = {"suspects": self.suspects.state_dict()}
        if self.adversary is not None:
            out["adversary"] = self.adversary.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`'s output; a missing part (an older checkpoint) starts empty."""
        state = state or {}
        self.suspects.load_state_dict(state.get("suspects"))
        if self.adversary is not None:
            self.adversary.load_state_dict(state.get("adversary"))


def checkpoint_state(algorithm: Any) -> dict[str, Any] | None:
    """The algorithm's Byzantine hooks' state for a checkpoint (None: the run has no hooks)."""
    hooks: ByzantineGossip | None = getattr(algorithm, "byzantine", None)
    return None if hooks is None else hooks.state_dict()


def restore_state(algorithm: Any, saved: dict[str, Any] | None) -> None:
    """Load :func:`checkpoint_state`'s output into the algorithm's hooks; None (a checkpoint written before
    this state was saved, or by a run without hooks) leaves them empty, as a fresh start."""
    hooks: ByzantineGossip | None = getattr(algorithm, "byzantine", None)
    if hooks is not None:
        hooks.load_state_dict(saved)

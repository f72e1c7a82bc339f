"""The attackers' side of a gossip step: replace each attacking client's outgoing state by its attack.

An attacker trains and mixes like everybody else; only what it sends is replaced, in the algorithm's
communicate step (:mod:`declora.algorithms.gossip`), before any encoding. So the same attack runs in every
runtime: in the simulation, under torchrun and as a swarm peer (``declora peer byzantine.peers=[3]
swarm.client_id=3 ...``: the attacker is the peer whose client id is listed).

What an attacker knows (its "view"). The omniscient attacks (scaled_update's mean, alie, ipm, dissensus)
use honest states. In the simulation every client's current state is in this process, so the attacker
uses its honest neighbours' states of this very round (as the reference implementation does). Under
torchrun and in the swarm an attacker only holds what it received: it uses the states its neighbours sent
it in the previous round (none in round 1: then only its own state). Attackers know each other
(``byzantine.peers``) and leave each other's messages out.

dissensus targets one honest neighbour t of the attacker (the lowest id; the reference's attacker has
exactly one neighbour, its target) and needs t's neighbours' states: all of them in the simulation, in
the other runtimes those of t's neighbours that are also the attacker's neighbours.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from declora.byzantine import attacks
from declora.config.byzantine import ByzantineConfig
from declora.types import State


def attack_generator(seed: int, round_: int, client: int) -> torch.Generator:
    """The gaussian attack's RNG for one attacker in one round (independent of process layout)."""
    value = int(np.random.SeedSequence([seed, 0xBAD, round_, client]).generate_state(1)[0])
    return torch.Generator().manual_seed(value)


class Adversary:
    """The attacking clients of ``byzantine.*`` and what each received last round."""

    def __init__(self, cfg: ByzantineConfig, seed: int = 0) -> None:
        self.peers = frozenset(cfg.peers)
        self.attack = cfg.attack
        self.strength = attacks.DEFAULT_STRENGTH[cfg.attack] if cfg.strength is None else float(cfg.strength)
        self.seed = seed
        self.last: dict[int, dict[int, State]] = {}  # attacker -> what its neighbours sent it last round

    @property
    def sends_lies(self) -> bool:
        """False for label_flip: it poisons its training data and sends its state as it is."""
        return bool(self.peers) and self.attack != "label_flip"

    def outgoing(self, states: dict[int, State], W: np.ndarray, round_: int) -> dict[int, State]:
        """``states`` with every local attacker's state replaced by its malicious message."""
        if not self.sends_lies or not self.peers & states.keys():
            return states
        out = dict(states)
        for a in sorted(self.peers & states.keys()):
            view = self.last.get(a, {}) | states  # this round's local states win (simulation: everyone's)
            out[a] = self.message(a, view, W, round_)
        return out

    def observe(self, received: Mapping[int, Mapping[int, State]]) -> None:
        """Remember what each local attacker received (its view next round outside the simulation)."""
        for a, inbox in received.items():
            if a in self.peers and self.sends_lies:
                self.last[a] = {j: {n: t.detach().clone() for n, t in s.items()} for j, s in inbox.items()}

    def state_dict(self) -> dict[str, Any]:
        """The attack memory (:attr:`last`), saved in checkpoints: a resumed attacker knows what it received."""
        return {"last": {a: {j: dict(s) for j, s in inbox.items()} for a, inbox in sorted(self.last.items())}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`'s output; None or ``{}`` (an older checkpoint) = nothing received yet."""
        last = (state or {}).get("last", {})
        self.last = {int(a): {int(j): dict(s) for j, s in inbox.items()} for a, inbox in last.items()}

    def message(self, a: int, view: Mapping[int, State], W: np.ndarray, round_: int) -> State:
        """Attacker ``a``'s message from its ``view`` (client id -> state it knows, its own included)."""
        own, s = view[a], self.strength
        honest_nbrs = [j for j in np.flatnonzero(W[a] > 0).tolist() if j != a and j not in self.peers]
        honest = [own] + [view[j] for j in honest_nbrs if j in view]
        if self.attack == "sign_flip":
            return attacks.sign_flip(own, s)
        if self.attack == "scaled_update":
            return attacks.scaled_update(own, honest, s)
        if self.attack == "gaussian":
            return attacks.gaussian(own, s, attack_generator(self.seed, round_, a))
        if self.attack == "alie":
            return attacks.alie(honest, s)
        if self.attack == "ipm":
            return attacks.ipm(honest, s)
        if self.attack == "dissensus":
            return self._dissensus(a, view, W, honest_nbrs)
        raise ValueError(f"byzantine.attack={self.attack!r} sends no message of its own")

    def _dissensus(self, a: int, view: Mapping[int, State], W: np.ndarray, honest_nbrs: list[int]) -> State:
        targets = [t for t in honest_nbrs if t in view]
        if not targets:  # knows none of its neighbours yet (round 1 outside the simulation)
            return view[a]
        t = targets[0]
        nbrs = [j for j in np.flatnonzero(W[t] > 0).tolist() if j != t]
        good = {j: view[j] for j in nbrs if j not in self.peers and j in view}
        byz = float(sum(W[t, j] for j in nbrs if j in self.peers))
        return attacks.dissensus(view[t], good, {j: float(W[t, j]) for j in good}, byz, self.strength)

"""The run's churn: the ``topology.link_drop``, ``train.peer_dropout``, ``train.availability_file``,
``train.stragglers`` and ``topology.dynamic_mixing`` options turned into one live round per round.

The trainer asks :meth:`Churn.from_config` once; with every option at its default it gets None and
the round loop is today's, bit for bit. Otherwise, each round it draws the :class:`LiveRound`
(:func:`declora.mixing.live.draw_live_round`, a pure function of the run seed and the round, so the
simulation, every torch.distributed rank and a resumed run draw the same graphs), lets the online
peers take ``live.steps[i]`` local steps, and hands the algorithm ``W_t`` in place of W. The
communicators exchange along ``W_t``'s support only, so a failed link carries nothing and an offline
peer (row ``e_i``) sends and receives nothing and keeps its state. :meth:`Churn.members` says which
peers the reported averaged model is the mean of (those that left for good or have not joined are out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from declora.config import Config
from declora.config.availability import Schedule, load_schedule
from declora.mixing.live import LiveRound, draw_live_round, dynamic_mixing_matrix
from declora.mixing.topology import spectral_gap


def churn_active(cfg: Config) -> bool:
    """Whether any churn option differs from its default (then rounds use live graphs)."""
    t, tp = cfg.train, cfg.topology
    return bool(t.peer_dropout or t.stragglers or t.availability_file or tp.link_drop)


@dataclass
class Churn:
    """Live rounds and their mixing matrices for one run.

    Attributes:
        W: the base (N, N) mixing matrix (the identity for algorithms without a graph).
        steps: K, the local steps of a peer that does not straggle.
    """

    W: np.ndarray
    seed: int
    steps: int
    link_drop: float = 0.0
    peer_dropout: float = 0.0
    stragglers: float = 0.0
    straggler_steps: float = 0.5
    rule: str = "diagonal"
    schedule: Schedule | None = None
    membership: bool = True  # False under runtime=swarm: a swarm peer has no global averaged model

    @classmethod
    def from_config(cls, cfg: Config, W: np.ndarray, steps: int) -> Churn | None:
        """The run's churn, or None when every churn option is at its default."""
        if not churn_active(cfg):
            return None
        t = cfg.train
        schedule = load_schedule(t.availability_file, t.clients) if t.availability_file else None
        return cls(
            W,
            t.seed,
            steps,
            cfg.topology.link_drop,
            t.peer_dropout,
            t.stragglers,
            t.straggler_steps,
            cfg.topology.dynamic_mixing,
            schedule,
            cfg.runtime != "swarm",
        )

    def live(self, round_: int) -> LiveRound:
        """Round ``round_``'s online peers, live edges and local step counts."""
        return draw_live_round(
            self.W,
            round_,
            self.seed,
            link_drop=self.link_drop,
            peer_dropout=self.peer_dropout,
            offline=self.schedule.offline(round_) if self.schedule else (),
            stragglers=self.stragglers,
            straggler_steps=self.straggler_steps,
            local_steps=self.steps,
        )

    def members(self, round_: int) -> list[int] | None:
        """The peers the averaged model of ``round_`` is the mean of; None = all N (today's mean).

        A peer that left for good (``train.availability_file``: offline from some round on, forever) is
        out from the round it left; one that has not joined yet (offline in every round so far) is out
        until it joins. Temporary outages (and ``train.peer_dropout``) keep a peer in: the all-member
        mean is the quantity gossip preserves. If no peer is left, the mean stays over all N.
        """
        if self.schedule is None or not self.membership:
            return None
        out = self.schedule.left(round_) | self.schedule.not_joined(round_)
        members = [i for i in range(self.W.shape[0]) if i not in out]
        return members if out and members else None

    def mixing(self, live: LiveRound) -> np.ndarray:
        """W_t of the live round (``topology.dynamic_mixing``)."""
        return dynamic_mixing_matrix(self.W, live, self.rule)

    def metrics(self, live: LiveRound, W_t: np.ndarray) -> dict[str, Any]:
        """The metrics row's churn columns: online peers, live edges, W_t's spectral gap, and the local
        steps all online peers took in rounds 1..t (``local_steps_taken``: what the run computed)."""
        gap = max(0.0, round(spectral_gap(W_t), 12))  # 0 (not 1e-16) when W_t is disconnected
        return {
            "online_peers": len(live.online),
            "live_edges": len(live.edges),
            "spectral_gap_t": gap,
            "local_steps_taken": self.steps_taken(live.round),
        }

    def steps_taken(self, rounds: int) -> int:
        """Local steps of all online peers over rounds ``1..rounds`` (recomputed: the draws are pure)."""
        return sum(sum(live.steps[i] for i in live.online) for live in map(self.live, range(1, rounds + 1)))

    def missed_rounds(self, rounds: int) -> list[int]:
        """How many of rounds ``1..rounds`` each peer was offline (recomputed: the draws are pure)."""
        missed = [0] * self.W.shape[0]
        for t in range(1, rounds + 1):
            online = set(self.live(t).online)
            for i in range(len(missed)):
                missed[i] += i not in online
        return missed

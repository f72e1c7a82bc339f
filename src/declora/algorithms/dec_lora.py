"""Dec-LoRA (Ghiasvand et al., 2025): gossip every trainable tensor, A and B mixed separately.

With ``comm.bits < 32`` the messages are quantized (:mod:`declora.mixing.compress`), and with
``comm.error_feedback`` the gossip is CHOCO's (:mod:`declora.algorithms.gossip`); its public copies are this
strategy's :meth:`state_dict`. With ``comm.robust`` or ``byzantine.peers`` every variant mixes through
:class:`~declora.byzantine.defense.ByzantineGossip` (robust rule, attackers' messages).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from declora.algorithms.base import Algorithm
from declora.algorithms.gossip import ChocoGossip, QuantizedGossip, build_gossip, exact_gossip
from declora.byzantine.defense import ByzantineGossip
from declora.comm.base import Communicator, State
from declora.config import Config


class DecLoRA(Algorithm):
    """``X_i <- sum_j W_ij X_j`` for every LoRA A, every LoRA B and the head, each on its own."""

    name = "dec_lora"
    uses_graph = True
    gossip: QuantizedGossip | ChocoGossip | None = None  # None: exact gossip
    byzantine: ByzantineGossip | None = None  # None: no robust rule, no attacker (plain gossip)

    def configure(self, cfg: Config) -> None:
        c = cfg.comm
        self.gossip = build_gossip(c.bits, c.scale, c.rounding, c.error_feedback, c.consensus_step, seed=cfg.train.seed)
        self.byzantine = ByzantineGossip.from_config(cfg)
        if cfg.runtime != "swarm":  # the reported model is the honest peers' (a swarm peer reports its own)
            self.excluded = frozenset(cfg.byzantine.peers)
        if self.gossip is not None:
            self.gossip.byzantine = self.byzantine

    def set_initial_state(self, init: State) -> None:
        if isinstance(self.gossip, ChocoGossip):
            self.gossip.reference = {n: t.detach().clone() for n, t in init.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.gossip.state_dict() if self.gossip is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.gossip is not None:
            self.gossip.load_state_dict(state)

    def communicate(
        self,
        states: dict[int, State],
        comm: Communicator,
        W: np.ndarray,
        participants: Sequence[int] | None = None,
    ) -> tuple[dict[int, State], int]:
        if self.gossip is None:
            return exact_gossip(comm, states, W, self.byzantine)
        return self.gossip(comm, states, W)

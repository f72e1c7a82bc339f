"""Dec-FFA-LoRA: Dec-LoRA with every LoRA A frozen at its shared initialisation.

Only B (and the task head) is trained and gossiped (FFA-LoRA, Sun et al. 2024). With A shared and
fixed, mixing B mixes the update ``B A`` exactly, so the averaged model is the average of the clients'
updates and the consensus-error amplification of mixing A and B separately disappears.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from declora.algorithms.base import Algorithm
from declora.algorithms.gossip import exact_gossip
from declora.byzantine.defense import ByzantineGossip
from declora.comm.base import Communicator, State
from declora.config import Config


def is_lora_A(name: str) -> bool:
    """Whether a trainable tensor is a LoRA down-projection A (peft names it ``...lora_A.<adapter>...``)."""
    return ".lora_A." in name


class DecFFALoRA(Algorithm):
    name = "dec_ffa_lora"
    uses_graph = True
    byzantine: ByzantineGossip | None = None  # comm.robust / byzantine.*: None = plain gossip

    def configure(self, cfg: Config) -> None:
        self.byzantine = ByzantineGossip.from_config(cfg)  # the rule sees B and the head, what is mixed
        if cfg.runtime != "swarm":  # the reported model is the honest peers' (a swarm peer reports its own)
            self.excluded = frozenset(cfg.byzantine.peers)

    def is_trained(self, name: str) -> bool:
        return not is_lora_A(name)

    def communicate(
        self,
        states: dict[int, State],
        comm: Communicator,
        W: np.ndarray,
        participants: Sequence[int] | None = None,
    ) -> tuple[dict[int, State], int]:
        sent_part = {i: {n: t for n, t in s.items() if self.is_trained(n)} for i, s in states.items()}
        mixed, sent = exact_gossip(comm, sent_part, W, self.byzantine)
        return {i: states[i] | mixed[i] for i in states}, sent

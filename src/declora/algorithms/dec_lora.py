"""Dec-LoRA (Ghiasvand et al., 2025): gossip every trainable tensor, A and B mixed separately."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from declora.algorithms.base import Algorithm
from declora.comm.base import Communicator, State


class DecLoRA(Algorithm):
    """``X_i <- sum_j W_ij X_j`` for every LoRA A, every LoRA B and the head, each on its own."""

    name = "dec_lora"
    uses_graph = True

    def communicate(
        self,
        states: dict[int, State],
        comm: Communicator,
        W: np.ndarray,
        participants: Sequence[int] | None = None,
    ) -> tuple[dict[int, State], int]:
        return comm.gossip(states, W)

"""Centralized LoRA: the paper's reference, one model on all data pooled."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from declora.algorithms.base import Algorithm
from declora.comm.base import Communicator, State
from declora.config import TrainConfig


class Centralized(Algorithm):
    """One model trained on the union of the clients' data.

    It processes the same number of samples as the decentralized run: ``clients * local_steps``
    steps of ``batch_size`` per round, so ``train.rounds`` compares like for like.
    """

    name = "centralized"

    def workers(self, train: TrainConfig) -> int:
        return 1

    def steps_per_round(self, train: TrainConfig) -> int:
        return train.clients * train.local_steps

    def communicate(
        self,
        states: dict[int, State],
        comm: Communicator,
        W: np.ndarray,
        participants: Sequence[int] | None = None,
    ) -> tuple[dict[int, State], int]:
        return states, 0

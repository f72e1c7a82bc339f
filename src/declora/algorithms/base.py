"""The algorithm strategy: how many models train, how many steps, and what happens between rounds.

An algorithm says *what* is exchanged and *how* it is combined; a :class:`~declora.comm.Communicator`
moves the tensors. Adding an algorithm = one small subclass + one line in ``ALGORITHMS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from declora.comm.base import Communicator, State
from declora.config import TrainConfig


class Algorithm(ABC):
    name: ClassVar[str]
    uses_graph: ClassVar[bool] = False  # True: the topology's W drives communication

    def workers(self, train: TrainConfig) -> int:
        """How many separately trained models there are (one per client unless pooled)."""
        return train.clients

    def steps_per_round(self, train: TrainConfig) -> int:
        """Local optimizer steps each worker takes per round."""
        return train.local_steps

    def is_trained(self, name: str) -> bool:
        """Whether the trainable tensor ``name`` gets gradients (False keeps it at its shared init)."""
        return True

    def participants(self, round_: int, train: TrainConfig) -> list[int]:
        """The workers that take local steps and send in round ``round_`` (1-based); the rest wait.

        All of them unless the algorithm samples clients (fedavg). It depends only on the config and the
        round, so every process computes the same list.
        """
        return list(range(self.workers(train)))

    @abstractmethod
    def communicate(
        self,
        states: dict[int, State],
        comm: Communicator,
        W: np.ndarray,
        participants: Sequence[int] | None = None,
    ) -> tuple[dict[int, State], int]:
        """Exchange after the local steps; returns the new local states and the bytes sent.

        Args:
            states: every local client's trainable tensors (participants or not).
            comm: the transport.
            W: (N, N) mixing matrix (the identity for algorithms without a graph).
            participants: this round's :meth:`participants`; None = all workers.
        """

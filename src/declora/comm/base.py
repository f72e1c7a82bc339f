"""The communicator interface: how client tensors move, independent of what an algorithm mixes.

A process owns ``local_clients``: every client in the in-process simulation, its own rank under
torch.distributed. Algorithms call only these methods, so the same algorithm code runs in both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

State = dict[str, torch.Tensor]


class Communicator(ABC):
    """Moves trainable tensors between clients and counts the bytes sent."""

    num_clients: int
    local_clients: list[int]

    @abstractmethod
    def gossip(self, states: dict[int, State], W: np.ndarray) -> tuple[dict[int, State], int]:
        """Every local client i receives its neighbours' tensors and returns ``sum_j W_ij X_j``.

        Args:
            states: local client id -> its state (same names and shapes for every client).
            W: (N, N) mixing matrix; client i talks only to j with ``W[i, j] > 0``.

        Returns:
            The mixed local states and the bytes the local clients sent.
        """

    @abstractmethod
    def average(self, states: dict[int, State]) -> tuple[State, int]:
        """The mean over all N clients of every tensor (a server's or all-reduce's view).

        Returns:
            The mean state and the bytes the local clients sent to compute it.
        """

    @abstractmethod
    def gather(self, values: dict[int, float]) -> dict[int, float]:
        """Metrics only (not counted as training traffic): every client's scalar, on every process."""

    @abstractmethod
    def total(self, value: float) -> float:
        """Metrics only: the sum of ``value`` over all processes (a process reports its local clients)."""

"""The communicator interface: how client tensors move, independent of what an algorithm mixes.

A process owns ``local_clients``: every client in the in-process simulation, its own rank under
torch.distributed. The one transport primitive is :meth:`Communicator.exchange` (send my message to
my graph neighbours, receive theirs); :meth:`Communicator.gossip` is built on it here, once, so the
simulation and torch.distributed run the very same mixing code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

State = dict[str, torch.Tensor]
Message = dict[str, torch.Tensor]  # what goes on the wire: a state, or an encoded (packed) state


def neighbors(W: np.ndarray, i: int) -> list[int]:
    """Clients j != i with ``W[i, j] > 0``, ascending (the fixed order every process sums in)."""
    return [int(j) for j in np.flatnonzero(W[i] > 0) if j != i]


def message_bytes(message: Message) -> int:
    """Bytes one message occupies on the wire."""
    return sum(t.numel() * t.element_size() for t in message.values())


class Communicator(ABC):
    """Moves messages between clients and counts the bytes sent."""

    num_clients: int
    local_clients: list[int]
    rank: int = 0  # this process; rank 0 writes the run directory
    round: int = 0  # the current round, set by the trainer (named in failure messages)

    def barrier(self) -> None:  # noqa: B027 - a no-op unless there are several processes
        """Wait until every process gets here (nothing to wait for in one process)."""

    def close(self) -> None:  # noqa: B027
        """Release the transport at the end of a run."""

    @abstractmethod
    def exchange(self, messages: dict[int, Message], W: np.ndarray) -> dict[int, dict[int, Message]]:
        """Every local client i sends ``messages[i]`` to each neighbour j of W and receives theirs.

        All clients' messages have the same names, shapes and dtypes (receivers size buffers from their
        own message).

        Returns:
            ``received[i][j]``: the message local client i got from neighbour j.
        """

    @abstractmethod
    def average(self, states: dict[int, State]) -> tuple[State, int]:
        """The mean over all N clients of every tensor (a server's or an all-reduce's view).

        Returns:
            The mean state (on every process) and the bytes the local clients sent to compute it.
        """

    @abstractmethod
    def gather(self, values: dict[int, float]) -> dict[int, float]:
        """Metrics only (not counted as traffic): every client's scalar, on every process."""

    @abstractmethod
    def total(self, value: float) -> float:
        """Metrics only: the sum of ``value`` over all processes."""

    def gossip(self, states: dict[int, State], W: np.ndarray) -> tuple[dict[int, State], int]:
        """``X_i <- sum_j W_ij X_j`` for every local client and every tensor separately.

        Sums in float64 in ascending j (self included), the same order on every transport.

        Returns:
            The mixed local states and the bytes the local clients sent.
        """
        received = self.exchange(states, W)
        sent = sum(len(neighbors(W, i)) * message_bytes(states[i]) for i in states)
        mixed: dict[int, State] = {}
        for i, own in states.items():
            inbox = received[i] | {i: own}
            mixed[i] = {
                name: sum(W[i, j] * inbox[j][name].double() for j in sorted(inbox)).to(own[name].dtype) for name in own
            }
        return mixed, sent

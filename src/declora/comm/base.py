"""The communicator interface: how client tensors move, independent of what an algorithm mixes.

A process owns ``local_clients``: every client in the in-process simulation, its own rank under
torch.distributed. The one transport primitive is :meth:`Communicator.exchange` (send my message to
my graph neighbours, receive theirs); :meth:`Communicator.send` adds the byte count (one formula), and
every gossip variant (:mod:`declora.algorithms.gossip`) is built on it, so the simulation and
torch.distributed run the very same mixing code (:func:`declora.mixing.kernel.mix_row`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from declora.mixing.kernel import state_bytes
from declora.types import Message, State


def neighbors(W: np.ndarray, i: int) -> list[int]:
    """Clients j != i with ``W[i, j] > 0``, ascending (the fixed order every process sums in)."""
    return [int(j) for j in np.flatnonzero(W[i] > 0) if j != i]


message_bytes = state_bytes  # bytes one message occupies on the wire (the one formula, in mixing.py)


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

    def join(self, done: Any, clients: dict[int, Any]) -> Any:
        """After start-up (and a resume): the progress to continue from. runtime=swarm catches up with
        the live peers here; every other runtime continues from ``done`` itself."""
        return done

    def round_matrix(self, W: np.ndarray, i: int, received: Mapping[int, Message]) -> np.ndarray:
        """The matrix local client i mixes with after an exchange that brought ``received``: W itself
        where every exchange happens; runtime=swarm gives W_t (failed edges' weights on the diagonal)."""
        return W

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

    def send(self, messages: dict[int, Message], W: np.ndarray) -> tuple[dict[int, dict[int, Message]], int]:
        """:meth:`exchange`, plus the bytes the local clients sent: each message once per neighbour."""
        received = self.exchange(messages, W)
        return received, sum(len(neighbors(W, i)) * message_bytes(messages[i]) for i in messages)

"""The simulation communicator: all N clients live in this process; sending is handing a reference."""

from __future__ import annotations

import numpy as np

from declora.comm.base import Communicator, Message, State, message_bytes, neighbors
from declora.mixing.kernel import average_states


class InProcessCommunicator(Communicator):
    """Simulates N peers in one process.

    Bytes are counted as a real network would carry them: client i sends its whole message once to
    each neighbour j (``W[i, j] > 0``, ``j != i``).
    """

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        self.local_clients = list(range(num_clients))

    def exchange(self, messages: dict[int, Message], W: np.ndarray) -> dict[int, dict[int, Message]]:
        return {i: {j: messages[j] for j in neighbors(W, i)} for i in messages}

    def average(self, states: dict[int, State]) -> tuple[State, int]:
        # Each client uploads once to a server (N messages); the download is not counted, as in FedAvg.
        mean = average_states([states[i] for i in sorted(states)])
        return mean, sum(message_bytes(s) for s in states.values())

    def gather(self, values: dict[int, float]) -> dict[int, float]:
        return dict(values)

    def total(self, value: float) -> float:
        return value

"""The simulation communicator: all N clients live in this process; gossip is one matrix product."""

from __future__ import annotations

import numpy as np

from declora.comm.base import Communicator, State
from declora.mixing import average_states, mix_states
from declora.models import state_bytes


class InProcessCommunicator(Communicator):
    """Simulates N peers in one process.

    Bytes are counted as a real network would carry them: client i sends its whole message once to
    each neighbour j (``W[i, j] > 0``, ``j != i``).
    """

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        self.local_clients = list(range(num_clients))

    def gossip(self, states: dict[int, State], W: np.ndarray) -> tuple[dict[int, State], int]:
        order = sorted(states)
        mixed = mix_states(W, [states[i] for i in order])
        degrees = ((W > 0).sum(axis=1) - (np.diag(W) > 0)).astype(int)
        sent = sum(int(degrees[i]) * state_bytes(states[i]) for i in order)
        return dict(zip(order, mixed, strict=True)), sent

    def average(self, states: dict[int, State]) -> tuple[State, int]:
        # Each client uploads once to a server (N messages); the download is not counted, as in FedAvg.
        return average_states([states[i] for i in sorted(states)]), sum(
            state_bytes(s) for s in states.values()
        )

    def gather(self, values: dict[int, float]) -> dict[int, float]:
        return dict(values)

    def total(self, value: float) -> float:
        return value

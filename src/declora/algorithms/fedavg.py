"""FedAvg (FedIT / FlowerTune style): a server averages the trainable tensors of the round's clients.

With ``train.clients_per_round = k`` a seeded sample of k clients trains and uploads each round; the
server's mean of their tensors is the new global model, which every client receives (a client that
sat the round out starts its next round from the current global model, as in FedAvg). Non-sampled
clients take no local steps and send nothing; their optimizer state and data position are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from declora.algorithms.base import Algorithm
from declora.comm.base import Communicator, State
from declora.config import TrainConfig


def sample_clients(num_clients: int, per_round: int | None, seed: int, round_: int) -> list[int]:
    """The clients of one round: all, or ``per_round`` drawn without replacement from ``(seed, round_)``."""
    if per_round is None or per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_, 0xFEDA])
    return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))


class FedAvg(Algorithm):
    """``X <- mean_{i in S_t} X_i`` on a server, then broadcast to every client.

    The mean is uniform over the participating clients (every client takes the same K steps of the same
    batch size, so example-count weighting would only matter for unequal partitions). It goes through
    :meth:`Communicator.average`, an all-reduce over *all* clients: participants send
    ``(N / |S_t|) X_i`` and the rest send zeros, so the average over N is the mean over S_t on every
    transport. Bytes count one upload per participant (the broadcast back is not counted, as for the
    communicator's ``average``).
    """

    name = "fedavg"

    def participants(self, round_: int, train: TrainConfig) -> list[int]:
        return sample_clients(train.clients, train.clients_per_round, train.seed, round_)

    def communicate(
        self,
        states: dict[int, State],
        comm: Communicator,
        W: np.ndarray,
        participants: Sequence[int] | None = None,
    ) -> tuple[dict[int, State], int]:
        active = set(range(comm.num_clients) if participants is None else participants)
        if not active:  # every sampled client is offline (train.peer_dropout): the global model stays
            return states, 0
        scale = comm.num_clients / len(active)
        contributions = {
            i: {n: (t * scale if scale != 1.0 else t) if i in active else torch.zeros_like(t) for n, t in s.items()}
            for i, s in states.items()
        }
        mean, sent = comm.average(contributions)
        uploads = sum(i in active for i in states)
        return {i: mean for i in states}, sent * uploads // max(len(states), 1)

"""The algorithm strategy: how many models train, how many steps, and what happens between rounds.

An algorithm says *what* is exchanged and *how* it is combined; a :class:`~declora.comm.Communicator`
moves the tensors. Adding an algorithm = one small subclass + one line in ``ALGORITHMS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from declora.comm.base import Communicator, State
from declora.config import Config, TrainConfig
from declora.mixing.kernel import squared_distance


def member_average(comm: Communicator, states: dict[int, State], members: Sequence[int] | None = None) -> State:
    """The mean over ``members`` of every tensor, on every runtime (None or all N: ``comm.average``).

    With a strict subset every process contributes ``(N / |members|) X_i`` in float64 for a member and
    zeros otherwise, so ``comm.average``'s mean over N (an all-reduce under torch.distributed) is the
    mean over the members; the result is cast back to each tensor's dtype.

    Args:
        states: this process's workers' tensors (all N in the simulation, one under torch.distributed).
    """
    if members is None or len(set(members)) == comm.num_clients:
        return comm.average(states)[0]
    chosen = set(members)
    if not chosen:
        raise ValueError("the averaged model needs at least one member")
    scale = comm.num_clients / len(chosen)
    wide = {
        i: {n: t.double() * scale if i in chosen else torch.zeros_like(t, dtype=torch.float64) for n, t in s.items()}
        for i, s in states.items()
    }
    mean = comm.average(wide)[0]
    like = next(iter(states.values()))
    return {n: mean[n].to(t.dtype) for n, t in like.items()}


class Algorithm(ABC):
    name: ClassVar[str]
    uses_graph: ClassVar[bool] = False  # True: the topology's W drives communication
    excluded: frozenset[int] = frozenset()  # byzantine.peers: never members of the reported model

    def configure(self, cfg: Config) -> None:  # noqa: B027 - nothing to read by default
        """Read the options the strategy needs (e.g. ``cfg.comm``); called once, before round 1."""

    def set_initial_state(self, init: State) -> None:  # noqa: B027 - nothing to remember by default
        """The trainable state every client starts from (known to all; e.g. CHOCO's first public copies)."""

    def workers(self, train: TrainConfig) -> int:
        """How many separately trained models there are (one per client unless pooled)."""
        return train.clients

    def steps_per_round(self, train: TrainConfig) -> int:
        """Local optimizer steps each worker takes per round."""
        return train.local_steps

    def client_init(self, client: int, init: State) -> State:
        """Client ``client``'s starting state: the shared ``init`` (peft.ranks cuts it to the peer's rank)."""
        return init

    def averaged(self, comm: Communicator, states: dict[int, State], members: Sequence[int] | None = None) -> State:
        """The evaluated averaged model: the mean of every tensor over ``members`` (metrics: not counted).

        Args:
            members: the workers the model is the mean of (:meth:`declora.mixing.churn.Churn.members`:
                peers that left for good or have not joined yet are out); None = all N.
        """
        if self.excluded:  # under attack the reported model is the honest peers' (declora.byzantine)
            members = [i for i in (members or range(comm.num_clients)) if i not in self.excluded]
        return member_average(comm, states, members)

    def distance(self, state: State, mean: State) -> float:
        """One worker's term of ``consensus_error``: ``sum over tensors of ||X_i - mean||^2``."""
        return squared_distance(state, mean)

    def finish_adapter(self, client: int, path: Path) -> None:  # noqa: B027 - nothing to change by default
        """Adjust client ``client``'s saved adapter folder (peft.ranks: to the peer's own rank)."""

    def is_trained(self, name: str) -> bool:
        """Whether the trainable tensor ``name`` gets gradients (False keeps it at its shared init)."""
        return True

    def participants(self, round_: int, train: TrainConfig) -> list[int]:
        """The workers that take local steps and send in round ``round_`` (1-based); the rest wait.

        All of them unless the algorithm samples clients (fedavg). It depends only on the config and the
        round, so every process computes the same list.
        """
        return list(range(self.workers(train)))

    def state_dict(self) -> dict[str, Any]:
        """State the algorithm keeps between rounds for this process's clients (e.g. CHOCO's public
        copies, error-feedback residuals), saved in every checkpoint; empty for stateless algorithms."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless by default
        """Restore what :meth:`state_dict` returned (on resume, before the first resumed round)."""

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

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

from declora.comm.base import Communicator, State
from declora.config import Config, TrainConfig


class Algorithm(ABC):
    name: ClassVar[str]
    uses_graph: ClassVar[bool] = False  # True: the topology's W drives communication

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

    def averaged(self, comm: Communicator, states: dict[int, State]) -> State:
        """The evaluated averaged model: the mean over all N workers of every tensor (metrics: not counted)."""
        return comm.average(states)[0]

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

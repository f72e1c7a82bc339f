"""Local training only: every client trains alone, nothing is sent (the lower reference)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from declora.algorithms.base import Algorithm
from declora.comm.base import Communicator, State


class LocalOnly(Algorithm):
    name = "local"

    def communicate(
        self,
        states: dict[int, State],
        comm: Communicator,
        W: np.ndarray,
        participants: Sequence[int] | None = None,
    ) -> tuple[dict[int, State], int]:
        return states, 0

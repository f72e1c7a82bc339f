"""Test oracles: slow, obviously-correct references the library itself does not need.

Moved out of ``src/declora`` (issue 22): nothing in the package calls them, the tests compare the
library's results against them. Import as ``from oracles import ...`` (tests/ is on sys.path).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from declora.mixing.compress import Quantizer
from declora.mixing.kernel import average_states, mix_row, squared_distance
from declora.mixing.live import LiveRound
from declora.rundir.layout import CHECKPOINTS, MARKER, ROUND_GLOB, round_of
from declora.types import State


def mix_states(W: np.ndarray, states: Sequence[State]) -> list[State]:
    """Every client's :func:`mix_row` over its support in W (all N clients in one place, as in a test)."""
    return [mix_row(W, i, {j: states[j] for j in np.flatnonzero(W[i] > 0).tolist() + [i]}) for i in range(len(states))]


def consensus_error(states: Sequence[State]) -> float:
    """``(1/N) sum_i ||X_i - mean_j X_j||^2``, summed over all tensors (squared Frobenius norms)."""
    mean = average_states(states)
    return sum(squared_distance(s, mean) for s in states) / len(states)


def check_dynamic_matrix(W_t: np.ndarray, live: LiveRound, atol: float = 1e-12) -> None:
    """Raise ValueError unless W_t is symmetric, non-negative, doubly stochastic and on live edges."""
    n = W_t.shape[0]
    allowed = np.eye(n, dtype=bool)
    for a, b in live.edges:
        allowed[a, b] = allowed[b, a] = True
    problems = []
    if not np.allclose(W_t, W_t.T, atol=atol):
        problems.append("not symmetric")
    if (W_t < -atol).any():
        problems.append("negative entries")
    if not np.allclose(W_t.sum(1), 1.0, atol=atol):
        problems.append("rows do not sum to 1")
    if (np.abs(W_t[~allowed]) > atol).any():
        problems.append("weight on a failed edge or offline peer")
    if problems:
        raise ValueError(f"W_t of round {live.round}: {', '.join(problems)}")


def latest_complete(run: Path) -> int:
    """The newest round whose marker exists and names it; 0 if there is none (checksums not verified)."""
    rounds = []
    for marker in (Path(run) / CHECKPOINTS).glob(f"{ROUND_GLOB}/{MARKER}"):
        try:
            if json.loads(marker.read_text())["round"] == round_of(marker.parent):
                rounds.append(round_of(marker.parent))
        except (OSError, ValueError, KeyError):
            continue
    return max(rounds, default=0)


def roundtrip(quantizer: Quantizer, state: State, generator: torch.Generator | None = None) -> State:
    """``decode(encode(state))``: what a neighbour receives."""
    return quantizer.decode(quantizer.encode(state, generator), state)

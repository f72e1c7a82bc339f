"""Membership-aware reporting under churn: who the averaged model and the consensus error are over.

Under ``train.availability_file`` a peer that left for good, or has not joined yet, is not a member
(:meth:`declora.mixing.churn.Churn.members`): the averaged model, the consensus error and
``adapters/average`` are over the members only. Each metrics row of a churn run also reports

* ``members``: how many peers the averaged model is the mean of;
* ``online_accuracy``: the accuracy of the mean over the peers online that round (None when none
  is), so the model of the peers present can be told from the all-member mean that gossip preserves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from declora.types import State


def member_consensus(distances: dict[int, float], members: Sequence[int] | None) -> float:
    """``consensus_error``: the mean of the members' squared distances to the averaged model."""
    ids = list(distances) if members is None else [i for i in members if i in distances]
    return float(np.mean([distances[i] for i in ids]))


def membership_metrics(
    averaged: Callable[[Sequence[int] | None], State],
    score: Callable[[State], float],
    accuracy: float,
    members: Sequence[int] | None,
    online: Sequence[int],
    num_workers: int,
) -> dict[str, Any]:
    """The row's ``members`` and ``online_accuracy``.

    Args:
        averaged: the algorithm's averaged model over the given peers (called on every process).
        score: accuracy of a state on the held-out split.
        accuracy: the row's ``accuracy`` (the members' mean), reused when the online peers are the members.
        members: the round's members (None = all ``num_workers``); online: the peers online that round.
    """
    group = set(range(num_workers)) if members is None else set(members)
    if not online:
        online_accuracy = None
    elif set(online) == group:
        online_accuracy = accuracy
    else:
        online_accuracy = score(averaged(sorted(online)))
    return {"members": len(group), "online_accuracy": online_accuracy}

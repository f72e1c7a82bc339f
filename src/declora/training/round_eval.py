"""Step 3 of a round: the numbers of the reported (averaged) model and of each client.

The averaged model is a definition, not an accident (README, "What is reported"): the mean over the
members (peers that left for good are out), the mean update for product-mixing algorithms, and the
honest peers only under attack.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from declora.byzantine.report import honest_accuracy, honest_members
from declora.client.client import Client
from declora.comm import Communicator
from declora.evaluation.evaluate import evaluate, length_sorted
from declora.evaluation.membership import member_consensus, membership_metrics
from declora.training.setup import Setup
from declora.types import State


def evaluate_round(
    s: Setup,
    clients: dict[int, Client],
    comm: Communicator,
    avg_idx: np.ndarray,
    client_idx: np.ndarray,
    local: dict[int, dict[str, Any]] | None = None,
    members: list[int] | None = None,
    online: list[int] | None = None,
) -> dict[str, Any]:
    """Averaged-model accuracy, per-client accuracy (mean/min/max) and the consensus error.

    Args:
        local: if given, filled with each local client's own numbers (``ranks/rank_<r>/metrics.jsonl``).
        members: the peers the averaged model and the consensus error are over (None: all).
        online: under churn, the peers online this round: adds ``members`` and ``online_accuracy``.
    """
    states = {i: c.state() for i, c in clients.items()}
    mean = s.algorithm.averaged(comm, states, members)  # metrics only: not counted
    avg = evaluate(s.model, mean, s.data, avg_idx, s.device, s.cfg.eval.batch_size)
    row: dict[str, Any] = {"accuracy": avg.accuracy, "eval_loss": avg.loss}
    if s.validation is not None:  # model selection only; draws no RNG, so the numbers above are unchanged
        val = evaluate(s.model, mean, s.validation, length_sorted(s.validation), s.device, s.cfg.eval.batch_size)
        row |= {"val_accuracy": val.accuracy, "val_loss": val.loss}
    dist = comm.gather({i: s.algorithm.distance(c.state(), mean) for i, c in clients.items()})  # products: dec_decaf
    workers = s.algorithm.workers(s.cfg.train)  # byzantine.peers: the consensus of the honest peers only
    row["consensus_error"] = member_consensus(dist, honest_members(members, s.algorithm.excluded, workers))
    if online is not None:

        def score(state: State) -> float:
            return evaluate(s.model, state, s.data, avg_idx, s.device, s.cfg.eval.batch_size).accuracy

        averaged = partial(s.algorithm.averaged, comm, states)
        row |= membership_metrics(averaged, score, avg.accuracy, members, online, workers)
    accs: dict[int, float] = {}
    if s.cfg.eval.clients:
        accs = comm.gather(
            {
                i: evaluate(s.model, c.state(), s.data, client_idx, s.device, s.cfg.eval.batch_size).accuracy
                for i, c in clients.items()
            }
        )
        values = list(accs.values())
        row |= {
            "client_accuracy_mean": float(np.mean(values)),
            "client_accuracy_min": float(np.min(values)),
            "client_accuracy_max": float(np.max(values)),
        } | honest_accuracy(accs, s.algorithm.excluded)  # byzantine.peers: honest_accuracy_mean/min
    else:
        row |= {"client_accuracy_mean": None, "client_accuracy_min": None, "client_accuracy_max": None}
    if local is not None:
        for i in clients:
            local[i] = {"client_accuracy": accs.get(i), "squared_distance": dist[i]}
    return row

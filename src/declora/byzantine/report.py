"""What a run under attack reports: the honest peers' numbers and the suspects each peer named.

Under ``byzantine.peers`` the reported accuracy, ``adapters/average`` and ``consensus_error`` are the
honest peers' (the attackers are left out of the averaged model through :attr:`Algorithm.excluded`);
metrics rows add ``honest_accuracy_mean``/``honest_accuracy_min`` (the honest peers' own models), and
summary.json adds ``suspects`` (the neighbours any honest peer flagged) and ``suspected_by``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from declora.byzantine.defense import ByzantineGossip


def honest_members(members: Sequence[int] | None, excluded: frozenset[int], workers: int) -> list[int] | None:
    """``members`` (None = all ``workers``) without the attackers; None when nobody is excluded."""
    if not excluded:
        return None if members is None else list(members)
    return [i for i in (range(workers) if members is None else members) if i not in excluded]


def honest_accuracy(accs: dict[int, float], excluded: frozenset[int]) -> dict[str, float]:
    """``honest_accuracy_mean``/``_min`` over the honest peers' own accuracies ({} without attackers)."""
    values = [a for i, a in accs.items() if i not in excluded]
    if not excluded or not values:
        return {}
    return {"honest_accuracy_mean": float(np.mean(values)), "honest_accuracy_min": float(np.min(values))}


def poison_labels(cfg: Any, clients: dict[int, Any], num_labels: int) -> None:
    """``byzantine.attack=label_flip``: the local attackers train on flipped labels (``Client.flip_labels``)."""
    if cfg.byzantine.attack != "label_flip":
        return
    for i in set(cfg.byzantine.peers) & clients.keys():
        clients[i].flip_labels = num_labels


def byzantine_summary(algorithm: Any, comm: Any, cfg: Any) -> dict[str, Any]:
    """summary.json's fields under ``byzantine.*`` or ``comm.robust`` ({} otherwise).

    Each process knows only its own clients' flags, so they travel through ``comm.gather`` as one number per
    client: the bitmask ``sum 2**j`` of the neighbours j it flagged (exact in float64 up to 52 clients;
    beyond that the list is left out and said so).
    """
    b, c = cfg.byzantine, cfg.comm
    if not b.peers and c.robust == "none":
        return {}
    out: dict[str, Any] = {"byzantine_peers": list(b.peers), "byzantine_attack": b.attack if b.peers else None}
    out["robust"] = c.robust
    hooks: ByzantineGossip | None = getattr(algorithm, "byzantine", None)
    if hooks is None or c.robust == "none":
        return out
    if comm.num_clients > 52:
        return out | {"suspects": None, "suspects_note": "not gathered: more than 52 clients"}
    masks = comm.gather({i: float(sum(2**j for j in hooks.suspects.of(i))) for i in comm.local_clients})
    by: dict[str, list[int]] = {}
    for i, mask in sorted(masks.items()):
        if i in b.peers:
            continue  # what an attacker "suspects" is not evidence
        for j in range(comm.num_clients):
            if int(mask) >> j & 1:
                by.setdefault(str(j), []).append(int(i))
    return out | {"suspects": sorted(int(j) for j in by), "suspected_by": by, "suspect_cuts": hooks.suspects.table()}

"""Time-varying gossip: which peers and links are live in a round, and the mixing matrix W_t they give.

Pure functions of (base graph, base W, round, seed, options): every runtime (the simulation, each
torch.distributed rank, each swarm peer) computes the same live round without talking to anyone.

**Drawing a round** (:func:`draw_live_round`). One generator per round, seeded by ``(seed, round)``,
draws three arrays of uniforms in a fixed order and always in full (N for peers, one per base edge in
sorted order, N for stragglers), so changing one probability never shifts the others' draws:

- peer i is offline if ``u_peer[i] < peer_dropout`` or a schedule says so;
- base edge e fails if ``u_edge[e] < link_drop`` (an edge with an offline end is down too);
- an online peer straggles if ``u_strag[i] < stragglers`` and then takes
  ``max(1, floor(straggler_steps * K))`` of its K local steps.

**Mixing on the live graph** (:func:`local_row`, :func:`dynamic_mixing_matrix`). Two rules:

- ``diagonal`` (default): ``W_t[i, j] = W[i, j]`` on a live edge; the weight of every failed edge is
  moved onto the diagonal of *both* ends, ``W_t[i, i] = W[i, i] + sum_{j failed} W[i, j]``. Row i needs
  only W's row i and the set of neighbours i actually exchanged with, so a peer computes it locally
  after its exchanges, without a coordinator. W is symmetric and the live-edge set is symmetric, so W_t
  is symmetric; each row still sums to 1 and no entry is negative, so W_t is doubly stochastic. Hence
  ``sum_i X_i`` is preserved by ``X <- W_t X``: the mean of all N peers is kept, and as an offline or
  isolated peer's row is ``e_i`` (it keeps its own state), the mean of the online peers is kept too.
- ``metropolis``: Metropolis-Hastings weights recomputed on the live subgraph,
  ``W_t[i, j] = 1 / (1 + max(d_i, d_j))`` with live degrees d, diagonal = 1 - row sum. Also symmetric
  and doubly stochastic, usually a faster mixer when many links are down, but row i needs each live
  neighbour's live degree (one more number per message).

Symmetry needs both ends of an edge to agree that the exchange happened; in the simulation and under
torch.distributed they do by construction (both draw the same live round). A transport that can lose a
message in one direction must treat the edge as failed at both ends (see the swarm runtime).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import numpy as np

DYNAMIC_MIXING_RULES = ("diagonal", "metropolis")


@dataclass(frozen=True)
class LiveRound:
    """Who is live in one round.

    Attributes:
        round: the round (1-based).
        online: sorted ids of the peers that train and exchange this round.
        edges: live edges ``(i, j)`` with ``i < j``, sorted: both ends online and the link up.
        steps: local steps of each online peer (fewer than K for stragglers).
    """

    round: int
    online: tuple[int, ...]
    edges: tuple[tuple[int, int], ...]
    steps: dict[int, int] = field(default_factory=dict)

    def neighbours(self, i: int) -> list[int]:
        """Peers i exchanges with this round, ascending."""
        return sorted({b for a, b in self.edges if a == i} | {a for a, b in self.edges if b == i})


def base_edges(W: np.ndarray) -> list[tuple[int, int]]:
    """The edges ``(i, j)``, ``i < j``, of W's support, sorted (the order the link draws follow)."""
    n = W.shape[0]
    return [(i, j) for i in range(n) for j in range(i + 1, n) if W[i, j] > 0]


def round_generator(seed: int, round_: int) -> np.random.Generator:
    """The generator of one round's live graph (independent of processes, clients and other options)."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0x11FE, round_]))


def draw_live_round(
    W: np.ndarray,
    round_: int,
    seed: int,
    *,
    link_drop: float = 0.0,
    peer_dropout: float = 0.0,
    offline: Collection[int] = (),
    stragglers: float = 0.0,
    straggler_steps: float = 0.5,
    local_steps: int = 1,
) -> LiveRound:
    """Draw round ``round_``'s live peers, live edges and local step counts (see the module docstring).

    Args:
        W: (N, N) base mixing matrix; its support is the base graph.
        round_: the round, 1-based.
        seed: the run seed.
        link_drop: probability that a base edge fails this round.
        peer_dropout: probability that a peer is offline this round.
        offline: peers a schedule takes offline this round, whatever the draw.
        stragglers: probability that an online peer finishes only part of its local steps.
        straggler_steps: the fraction of ``local_steps`` a straggler takes (at least one step).
        local_steps: K.

    Example:
        >>> W = np.full((3, 3), 1 / 3)
        >>> draw_live_round(W, 1, 0).edges
        ((0, 1), (0, 2), (1, 2))
    """
    n = W.shape[0]
    edges = base_edges(W)
    rng = round_generator(seed, round_)
    u_peer, u_edge, u_strag = rng.random(n), rng.random(len(edges)), rng.random(n)
    down = set(offline)
    online = tuple(i for i in range(n) if u_peer[i] >= peer_dropout and i not in down)
    up = set(online)
    live = tuple(e for e, u in zip(edges, u_edge, strict=True) if u >= link_drop and e[0] in up and e[1] in up)
    few = max(1, math.floor(straggler_steps * local_steps))
    steps = {i: (min(few, local_steps) if u_strag[i] < stragglers else local_steps) for i in online}
    return LiveRound(round_, online, live, steps)


def local_row(
    W: np.ndarray,
    i: int,
    exchanged: Iterable[int],
    rule: str = "diagonal",
    degrees: dict[int, int] | None = None,
) -> np.ndarray:
    """Row i of W_t from what peer i knows after its exchanges.

    Args:
        W: (N, N) base mixing matrix.
        i: the peer.
        exchanged: the neighbours i exchanged with this round (both directions succeeded).
        rule: ``diagonal`` or ``metropolis``.
        degrees: live degrees of i's exchanged neighbours (``metropolis`` only).

    Returns:
        (N,) non-negative row summing to 1, supported on ``{i} | exchanged``.
    """
    live = sorted(set(exchanged) - {i})
    row = np.zeros(W.shape[0])
    if rule == "diagonal":
        row[live] = W[i, live]
        failed = [j for j in np.flatnonzero(W[i] > 0).tolist() if j != i and j not in live]
        row[i] = W[i, i] + sum(W[i, j] for j in failed)  # with no failure: W's own row, bit for bit
        return row
    if rule == "metropolis":
        if degrees is None:
            raise ValueError("metropolis W_t needs the live degrees of the exchanged neighbours")
        for j in live:
            row[j] = 1.0 / (1 + max(len(live), degrees[j]))
    else:
        raise ValueError(f"topology.dynamic_mixing={rule!r}: use one of {', '.join(DYNAMIC_MIXING_RULES)}")
    row[i] = 1.0 - row.sum()
    return row


def dynamic_mixing_matrix(W: np.ndarray, live: LiveRound, rule: str = "diagonal") -> np.ndarray:
    """W_t for a whole live round: every peer's :func:`local_row` (offline peers keep their state)."""
    n = W.shape[0]
    nbrs = {i: live.neighbours(i) for i in range(n)}
    degrees = {i: len(v) for i, v in nbrs.items()}
    return np.stack([local_row(W, i, nbrs[i], rule, degrees) for i in range(n)])

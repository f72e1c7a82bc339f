"""Communication graphs and gossip mixing matrices for decentralized (Dec-LoRA) training.

Every graph has integer nodes ``0..N-1`` (one per client) and no self-loops. A mixing matrix ``W`` is
symmetric, doubly stochastic, non-negative and supported on the graph's edges plus the diagonal, so one
gossip step ``x_i <- sum_j W_ij x_j`` only needs messages between neighbours.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np

from declora.errors import ConfigError
from declora.mixing.edge_list import read_edge_list

if TYPE_CHECKING:
    from declora.config import TopologyConfig

TOPOLOGIES = ("ring", "erdos_renyi", "complete", "star", "torus", "grid", "edge_list")
MIXING_RULES = ("laplacian", "metropolis", "max_degree")


def _canonical(graph: nx.Graph, num_nodes: int) -> nx.Graph:
    """Copy ``graph`` onto nodes ``0..num_nodes-1`` (inserted in order), dropping self-loops."""
    out = nx.Graph()
    out.add_nodes_from(range(num_nodes))
    out.add_edges_from((int(u), int(v)) for u, v in graph.edges() if u != v)
    return out


def _default_rows(num_nodes: int) -> int:
    """Largest divisor of ``num_nodes`` that is <= sqrt(num_nodes)."""
    return max(r for r in range(1, math.isqrt(num_nodes) + 1) if num_nodes % r == 0)


def build_graph(
    kind: str,
    num_nodes: int,
    *,
    p: float = 0.5,
    seed: int = 0,
    rows: int | None = None,
    edges_file: str | None = None,
    max_tries: int = 100,
) -> nx.Graph:
    """Build a connected communication graph on nodes ``0..num_nodes-1``.

    Args:
        kind: One of :data:`TOPOLOGIES`.
        num_nodes: Number of clients N (>= 1).
        p: Edge probability for ``erdos_renyi``.
        seed: Base seed for ``erdos_renyi``; attempt ``k`` uses ``seed + k``.
        rows: Row count for ``torus``/``grid`` (must divide N); default is the largest divisor of N
            that is <= sqrt(N). Stored in ``graph.graph["rows"]``.
        edges_file: Whitespace-separated ``i j`` edge list for ``edge_list`` (``#`` starts a comment).
        max_tries: Resampling budget for ``erdos_renyi`` until the graph is connected.

    Returns:
        An undirected ``nx.Graph`` with integer nodes ``0..N-1`` and no self-loops.

    Raises:
        ValueError: One line naming the offending config option and how to fix it.
    """
    n = int(num_nodes)
    if n < 1:
        raise ValueError(f"train.clients={num_nodes} is invalid; the topology needs at least 1 client")
    if kind == "ring":
        return _canonical(nx.cycle_graph(n), n)
    if kind == "complete":
        return _canonical(nx.complete_graph(n), n)
    if kind == "star":
        return _canonical(nx.star_graph(n - 1), n)
    if kind in ("torus", "grid"):
        r = _default_rows(n) if rows is None else int(rows)
        if r < 1 or n % r != 0:
            divisors = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
            raise ValueError(
                f"topology.rows={rows} does not divide train.clients={n}; set topology.rows to one of: {divisors}"
            )
        cols = n // r
        grid = nx.grid_2d_graph(r, cols, periodic=(kind == "torus"))
        g = _canonical(nx.relabel_nodes(grid, {(i, j): i * cols + j for i, j in grid.nodes()}), n)
        g.graph["rows"] = r
        return g
    if kind == "erdos_renyi":
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"topology.p={p} is not a probability; set topology.p in (0, 1]")
        for attempt in range(max_tries):
            g = _canonical(nx.erdos_renyi_graph(n, p, seed=seed + attempt), n)
            if nx.is_connected(g):
                return g
        threshold = math.log(n) / n
        raise ValueError(
            f"topology.p={p} gave no connected Erdős–Rényi graph on {n} nodes in {max_tries} tries; "
            f"raise topology.p (connectivity needs p > ln(N)/N ≈ {threshold:.2f})"
        )
    if kind == "edge_list":
        return read_edge_list(edges_file, n)
    raise ValueError(f"topology.kind={kind!r} is unknown; choose one of: {', '.join(TOPOLOGIES)}")


def mixing_matrix(graph: nx.Graph, rule: str = "laplacian") -> np.ndarray:
    """Gossip mixing matrix ``W`` (float64, N x N, rows/cols indexed by sorted node id).

    Rules:
        * ``laplacian``: ``W = I - 2 L / (3 lambda_max(L))`` with ``L`` the graph Laplacian (the Dec-LoRA
          paper's rule); ``[[1.0]]`` for a single node.
        * ``metropolis``: ``W_ij = 1 / (1 + max(d_i, d_j))`` on edges, diagonal ``1 - row sum``.
        * ``max_degree``: ``W_ij = 1 / (1 + d_max)`` on edges, diagonal ``1 - row sum``. On a complete
          graph this is exactly uniform ``1/N`` averaging, i.e. FedAvg.

    Args:
        graph: Undirected graph with nodes ``0..N-1``.
        rule: One of :data:`MIXING_RULES`.

    Raises:
        ValueError: If ``rule`` is unknown (names ``topology.mixing``).
    """
    if rule not in MIXING_RULES:
        raise ValueError(f"topology.mixing={rule!r} is unknown; choose one of: {', '.join(MIXING_RULES)}")
    nodes = sorted(graph.nodes())
    n = len(nodes)
    adj = nx.to_numpy_array(graph, nodelist=nodes, weight=None, dtype=np.float64)
    np.fill_diagonal(adj, 0.0)
    deg = adj.sum(axis=1)
    if rule == "laplacian":
        lap = np.diag(deg) - adj  # == nx.laplacian_matrix(graph, nodes), without the scipy dependency
        lam_max = float(np.linalg.eigvalsh(lap)[-1]) if n > 0 else 0.0
        if lam_max <= 0.0:
            return np.eye(n, dtype=np.float64)
        return np.eye(n) - 2.0 * lap / (3.0 * lam_max)
    if rule == "metropolis":
        w = adj / (1.0 + np.maximum.outer(deg, deg))
    else:
        w = adj / (1.0 + (deg.max() if n > 0 else 0.0))
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def check_mixing_matrix(W: np.ndarray, graph: nx.Graph, atol: float = 1e-8) -> None:
    """Validate that ``W`` is a proper gossip matrix for ``graph``.

    Checks connectivity, shape ``N x N``, symmetry, non-negativity, unit row and column sums, and zero
    weight on every non-edge ``i != j``.

    Raises:
        ValueError: One line naming the first check that failed.
    """
    n = graph.number_of_nodes()
    if n == 0 or not nx.is_connected(graph):
        raise ValueError("mixing check failed: the communication graph is not connected")
    W = np.asarray(W, dtype=np.float64)
    if W.shape != (n, n):
        raise ValueError(f"mixing check failed: W has shape {W.shape}, expected ({n}, {n})")
    if not np.allclose(W, W.T, atol=atol, rtol=0.0):
        raise ValueError(f"mixing check failed: W is not symmetric (max |W - W.T| = {np.abs(W - W.T).max():.3g})")
    if W.min() < -atol:
        raise ValueError(f"mixing check failed: W has negative entries (min {W.min():.3g})")
    for axis, name in ((1, "row"), (0, "column")):
        err = np.abs(W.sum(axis=axis) - 1.0).max()
        if err > atol:
            raise ValueError(f"mixing check failed: W {name} sums differ from 1 by up to {err:.3g}")
    adj = nx.to_numpy_array(graph, nodelist=sorted(graph.nodes()), weight=None) > 0
    off_edge = ~adj & ~np.eye(n, dtype=bool)
    if np.any(np.abs(W[off_edge]) > atol):
        i, j = np.argwhere(off_edge & (np.abs(W) > atol))[0]
        raise ValueError(f"mixing check failed: W[{i}, {j}] = {W[i, j]:.3g} but ({i}, {j}) is not an edge")


def spectral_gap(W: np.ndarray) -> float:
    """``1 - |lambda_2(W)|``, ``lambda_2`` the second-largest eigenvalue by magnitude (1.0 if N=1)."""
    W = np.asarray(W, dtype=np.float64)
    if W.shape[0] <= 1:
        return 1.0
    mags = np.sort(np.abs(np.linalg.eigvalsh(W)))[::-1]
    return float(1.0 - mags[1])


def rms_contraction(W: np.ndarray) -> float:
    """Root-mean-square of the non-consensus eigenvalues, ``||W - 11^T/N||_F / sqrt(N - 1)``.

    ``|lambda_2|`` (one minus the spectral gap) bounds how much one mixing step can shrink the distance
    to the mean in the *worst* case; this is the *typical* factor: for a disagreement drawn isotropically
    from the subspace orthogonal to the all-ones vector, ``E ||W x||^2 = rms^2 ||x||^2``. Two graphs can
    order differently by the two (a 10-node torus has the larger gap, ER(p=0.6) the smaller rms). 0.0 if N=1.
    """
    W = np.asarray(W, dtype=np.float64)
    n = W.shape[0]
    if n <= 1:
        return 0.0
    return float(np.linalg.norm(W - np.full_like(W, 1.0 / n)) / np.sqrt(n - 1))


@dataclass(frozen=True, eq=False)
class Topology:
    """A communication graph together with its validated mixing matrix.

    Attributes:
        graph: Undirected graph on nodes ``0..N-1``.
        W: Mixing matrix (float64, N x N).
        kind: Topology name (one of :data:`TOPOLOGIES`).
        mixing: Mixing rule (one of :data:`MIXING_RULES`).
    """

    graph: nx.Graph
    W: np.ndarray
    kind: str
    mixing: str

    @classmethod
    def build(
        cls,
        kind: str,
        num_nodes: int,
        *,
        mixing: str = "laplacian",
        p: float = 0.5,
        seed: int = 0,
        rows: int | None = None,
        edges_file: str | None = None,
    ) -> Topology:
        """Build the graph and its mixing matrix, then check them (see :func:`build_graph`)."""
        graph = build_graph(kind, num_nodes, p=p, seed=seed, rows=rows, edges_file=edges_file)
        W = mixing_matrix(graph, mixing)
        check_mixing_matrix(W, graph)
        return cls(graph=graph, W=W, kind=kind, mixing=mixing)

    @classmethod
    def from_config(cls, t: TopologyConfig, num_nodes: int, seed: int) -> Topology:
        """The topology of a config's ``topology`` section (``topology.seed`` overrides the run ``seed``).

        Raises:
            ConfigError: one line naming the option, for a graph or rule that cannot be built.
        """
        try:
            return cls.build(
                t.kind,
                num_nodes,
                mixing=t.mixing,
                p=t.p,
                seed=seed if t.seed is None else t.seed,
                rows=t.rows,
                edges_file=t.edges_file,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None

    @property
    def num_nodes(self) -> int:
        """Number of clients N."""
        return self.graph.number_of_nodes()

    @property
    def degrees(self) -> list[int]:
        """Degree of each node, indexed by node id."""
        return [int(self.graph.degree(i)) for i in range(self.num_nodes)]

    def neighbors(self, i: int) -> list[int]:
        """Sorted neighbours of node ``i`` (excluding ``i`` itself)."""
        return sorted(int(j) for j in self.graph.neighbors(i) if j != i)

    @property
    def spectral_gap(self) -> float:
        """Spectral gap ``1 - |lambda_2(W)|`` of the mixing matrix."""
        return spectral_gap(self.W)

    @property
    def rms_contraction(self) -> float:
        """Typical per-step contraction of the distance to the mean (see :func:`rms_contraction`)."""
        return rms_contraction(self.W)

    def describe(self, precision: int = 3) -> str:
        """Readable multi-line summary: kind, N, edge count, degrees, W, spectral gap and rms contraction."""
        matrix = np.array2string(
            self.W, precision=precision, floatmode="fixed", suppress_small=True, max_line_width=10_000
        )
        lines = [f"topology: {self.kind} (mixing: {self.mixing})", f"nodes: {self.num_nodes}"]
        lines += [f"edges: {self.graph.number_of_edges()}", f"degrees: {self.degrees}", "W =", matrix]
        lines += [f"spectral gap: {self.spectral_gap:.{precision}f}"]
        lines += [f"rms contraction: {self.rms_contraction:.{precision}f}"]
        return "\n".join(lines)


def draw_topology(topology: Topology, path: str) -> None:
    """Save a PNG drawing of the topology's graph to ``path`` (parent dirs are created).

    Torus/grid graphs are drawn on their grid positions; other kinds use a circular layout.
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # nx.draw imports pyplot; keep it headless
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    g = topology.graph
    if topology.kind in ("torus", "grid"):
        rows = int(g.graph.get("rows", _default_rows(topology.num_nodes)))
        cols = topology.num_nodes // rows
        pos = {i: (i % cols, -(i // cols)) for i in g.nodes()}
    else:
        pos = nx.circular_layout(g)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)  # Agg canvas: no GUI backend and no pyplot global state
    ax = fig.add_subplot()
    nx.draw(g, pos=pos, ax=ax, with_labels=True, node_color="#8ecae6", edge_color="#555555", node_size=400)
    ax.set_title(f"{topology.kind}  N={topology.num_nodes}  spectral gap={topology.spectral_gap:.3f}")
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight")

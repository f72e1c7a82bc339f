"""``topology.*``: the communication graph and its mixing matrix W."""

from __future__ import annotations

from dataclasses import dataclass

from declora.config.fields import _choice, _f, _fraction, _int_at_least, _seed
from declora.errors import ConfigError


@dataclass
class TopologyConfig:
    kind: str = _f("ring", "Graph: ring, erdos_renyi, complete, star, torus, grid, edge_list.")
    mixing: str = _f("laplacian", "laplacian (I - 2L/(3 lambda_max), the paper's), metropolis, or max_degree.")
    p: float = _f(0.5, "Edge probability for erdos_renyi (resampled until connected).")
    rows: int | None = _f(None, "Rows of a torus/grid; null = the most square factorisation.")
    edges_file: str | None = _f(None, "Whitespace-separated 'i j' edge list for kind=edge_list.")
    seed: int | None = _f(None, "Graph seed; null = train.seed.")
    link_drop: float = _f(
        0.0, "Probability in [0, 1] that each edge of the graph fails in a round (drawn per round from train.seed)."
    )
    dynamic_mixing: str = _f(
        "diagonal",
        "W_t on a round's live graph: diagonal (a failed edge's weight moves onto both ends' diagonal; "
        "computable by each peer alone) or metropolis (Metropolis weights of the live graph).",
    )

    def __post_init__(self) -> None:
        _fraction("topology.link_drop", self.link_drop)
        _choice("topology.dynamic_mixing", self.dynamic_mixing, ("diagonal", "metropolis"))
        _choice(
            "topology.kind",
            self.kind,
            ("ring", "erdos_renyi", "complete", "star", "torus", "grid", "edge_list"),
        )
        _choice("topology.mixing", self.mixing, ("laplacian", "metropolis", "max_degree"))
        if not 0.0 < self.p <= 1.0:
            raise ConfigError(f"topology.p={self.p} must be in (0, 1]")
        _int_at_least("topology.rows", self.rows, 1, optional=True)
        _seed("topology.seed", self.seed)
        if self.kind == "edge_list" and not self.edges_file:
            raise ConfigError("topology.edges_file is required for topology.kind=edge_list")

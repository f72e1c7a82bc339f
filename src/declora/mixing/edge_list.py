"""``topology.kind=edge_list``: the graph of an ``i j`` edge-list file, read strictly.

One undirected edge per line (``#`` starts a comment, blank lines are skipped). A line that is not two
node ids, a self-loop, an edge given twice (either direction) or a node id outside ``0..N-1`` is one
error naming the file and the line, as is a node without edges or a disconnected graph: a typo never
silently changes the graph a run gossips on.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx


def _parse_edge_line(line: str, n: int) -> tuple[int, int] | str:
    """One line's edge ``(i, j)``, or (a string) why it is not one and the fix."""
    tokens = line.split()
    if len(tokens) != 2 or not all(t.lstrip("-").isdigit() for t in tokens):
        return f"{line.strip()!r} is not an 'i j' pair of node ids; write one 'i j' per line"
    i, j = (int(t) for t in tokens)
    bad = next((x for x in (i, j) if not 0 <= x < n), None)
    if bad is not None:
        return f"node {bad} is out of range: nodes are 0..{n - 1} (train.clients={n}); renumber it"
    if i == j:
        return f"'{i} {j}' is a self-loop; every client keeps its own weight already (W_ii): delete the line"
    return i, j


def read_edge_list(edges_file: str | None, n: int) -> nx.Graph:
    """Read an ``i j`` edge-list file for ``n`` clients strictly: a junk line, a self-loop, a duplicate
    edge or a node id out of range is one error naming the file and the line (``#`` starts a comment)."""
    if edges_file is None or not Path(edges_file).is_file():
        raise ValueError(f"topology.edges_file={edges_file!r} is not a readable file; point it at an 'i j' edge list")
    try:
        lines = Path(edges_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"topology.edges_file={edges_file!r} cannot be read ({exc}); give a text file") from None
    seen: dict[tuple[int, int], int] = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0]
        if not line.strip():
            continue
        edge = _parse_edge_line(line, n)
        if isinstance(edge, str):
            raise ValueError(f"topology.edges_file={edges_file!r}: line {number}: {edge}")
        key = (min(edge), max(edge))
        if key in seen:
            raise ValueError(
                f"topology.edges_file={edges_file!r}: line {number}: edge {edge[0]}-{edge[1]} repeats line "
                f"{seen[key]} (edges are undirected); delete one of them"
            )
        seen[key] = number
    raw = nx.Graph(list(seen))
    nodes = set(raw.nodes())
    expected = set(range(n))
    if nodes != expected:
        raise ValueError(
            f"topology.edges_file={edges_file!r} must use exactly nodes 0..{n - 1} (train.clients={n}); "
            f"missing nodes {sorted(expected - nodes)}"
        )
    g = nx.Graph()
    g.add_nodes_from(range(n))  # nodes in order 0..n-1, as every other graph kind has them
    g.add_edges_from(raw.edges())
    if not nx.is_connected(g):
        raise ValueError(
            f"topology.edges_file={edges_file!r} describes a disconnected graph "
            f"({nx.number_connected_components(g)} components); add edges so all clients are connected"
        )
    return g

"""Partitioners that split a training set's example indices over clients.

Example:
    >>> import numpy as np
    >>> from declora.partition import build_partitioner, partition_counts
    >>> labels = np.random.default_rng(0).integers(0, 2, size=1000)
    >>> parts = build_partitioner("dirichlet", 4, alpha=0.5, seed=0).split(labels)
    >>> partition_counts(parts, labels).shape
    (4, 2)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from declora.errors import ConfigError
from declora.partition.base import Partitioner, partition_counts
from declora.partition.dirichlet import DirichletPartitioner
from declora.partition.iid import IidPartitioner
from declora.partition.label_proportions import LabelProportionsPartitioner
from declora.partition.shards import ShardPartitioner

if TYPE_CHECKING:
    from declora.config import PartitionConfig

__all__ = [
    "PARTITIONERS",
    "DirichletPartitioner",
    "IidPartitioner",
    "LabelProportionsPartitioner",
    "Partitioner",
    "ShardPartitioner",
    "build_partitioner",
    "partitioner_from_config",
    "partition_counts",
    "plot_partition",
]

PARTITIONERS: dict[str, type[Partitioner]] = {
    "iid": IidPartitioner,
    "dirichlet": DirichletPartitioner,
    "label_proportions": LabelProportionsPartitioner,
    "shards": ShardPartitioner,
}


def build_partitioner(kind: str, num_partitions: int, *, seed: int = 0, **options: Any) -> Partitioner:
    """Builds the partitioner registered as ``kind`` in :data:`PARTITIONERS`.

    Args:
        kind: A key of ``PARTITIONERS``: iid, dirichlet, label_proportions, shards.
        num_partitions: Number of clients (``train.clients``).
        seed: Partition seed.
        **options: ``partition.*`` values (alpha, min_partition_size, proportions, shards_per_client);
            each partitioner takes the ones named in its ``options`` and ignores the rest.

    Returns:
        A configured :class:`Partitioner`.

    Raises:
        ValueError: On an unknown ``kind`` or invalid options for it.

    Example:
        >>> build_partitioner("shards", 10, shards_per_client=2, alpha=0.3).shards_per_client
        2
    """
    if kind not in PARTITIONERS:
        raise ValueError(f"partition.kind={kind!r} is unknown; choose one of {', '.join(PARTITIONERS)}")
    cls = PARTITIONERS[kind]
    return cls(num_partitions, seed=seed, **{k: options[k] for k in cls.options if k in options})


def partitioner_from_config(p: PartitionConfig, num_partitions: int, seed: int) -> Partitioner:
    """The partitioner of a config's ``partition`` section (``partition.seed`` overrides ``seed``).

    Raises:
        ConfigError: one line naming the option, for options the partitioner rejects.
    """
    options = {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name not in ("kind", "seed")}
    try:
        return build_partitioner(p.kind, num_partitions, seed=seed if p.seed is None else p.seed, **options)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def plot_partition(counts: np.ndarray, path: str, label_names: list[str] | None = None, title: str = "") -> None:
    """Saves a stacked bar chart of per-client label counts (one bar per client).

    Args:
        counts: (N, C) counts, e.g. from :func:`partition_counts`.
        path: Output image file; parent directories are created.
        label_names: One legend name per class; defaults to "class 0", "class 1", ...
        title: Figure title.

    Example:
        >>> plot_partition(np.array([[5, 1], [2, 4]]), "/tmp/declora_partition.png", ["neg", "pos"])
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must have shape (clients, classes), got {counts.shape}")
    num_clients, num_classes = counts.shape
    names = label_names if label_names is not None else [f"class {c}" for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} label_names for {num_classes} classes; give one per class")
    # Two panels: examples per client (absolute), and each client's label shares, where a client with
    # few examples is as visible as a large one. The legend sits outside, right of the panels.
    fig = Figure(figsize=(max(6.0, 0.8 * num_clients + 3.5), 3.8))
    FigureCanvasAgg(fig)
    ax, share_ax = fig.subplots(1, 2)
    x = np.arange(num_clients)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    bottom, share_bottom = np.zeros(num_clients), np.zeros(num_clients)
    for c in range(num_classes):
        ax.bar(x, counts[:, c], bottom=bottom, label=names[c])
        share_ax.bar(x, shares[:, c], bottom=share_bottom)
        bottom += counts[:, c]
        share_bottom += shares[:, c]
    for a in (ax, share_ax):
        a.set_xticks(x)
        a.set_xlabel("client")
    ax.set_ylabel("examples")
    share_ax.set_ylabel("label share")
    share_ax.set_ylim(0, 1)
    share_ax.set_xticks(x, [f"{i}\n({n})" for i, n in enumerate(counts.sum(1))] if num_clients <= 12 else x)
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")

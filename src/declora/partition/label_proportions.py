"""Explicit per-client label proportions, e.g. the Dec-LoRA paper's label-skew split."""

from __future__ import annotations

import numpy as np

from declora.partition.base import Partitioner


def _round_rows(target: np.ndarray) -> np.ndarray:
    """Rounds each row of ``target`` (rows summing to an integer) by largest remainder."""
    floor = np.floor(target + 1e-9)
    counts = floor.astype(np.int64)
    missing = np.rint(target.sum(axis=1)).astype(np.int64) - counts.sum(axis=1)
    for i, m in enumerate(missing):
        if m > 0:
            counts[i, np.argsort(-(target[i] - floor[i]), kind="stable")[:m]] += 1
    return counts


class LabelProportionsPartitioner(Partitioner):
    """Gives every client the same number of examples with a requested class mix.

    Client i gets n examples, ``round(n * proportions[i][c])`` of them from class c
    (largest-remainder rounding: sizes are exactly n and every class count is within one
    example of ``n * proportions[i][c]``). n is the largest size that the training set
    can supply for all clients at once; examples of a class are drawn without replacement
    (seeded), so clients are disjoint. Not every example is used in general.

    A shorter list repeats cyclically when ``num_partitions`` is a multiple of its
    length: ``[[0.15, 0.85], [0.85, 0.15]]`` over 10 clients repeats 5 times.

    Args:
        num_partitions: Number of clients (``train.clients``), >= 1.
        proportions: Rows of per-class proportions (``partition.proportions``): each row
            is non-negative, sums to 1 (tolerance 1e-6) and has one entry per class.
        seed: Seed of the per-class sampling.

    Raises:
        ValueError: On malformed proportions (naming ``partition.proportions``).

    Example:
        >>> import numpy as np
        >>> labels = np.repeat([0, 1], 100)
        >>> p = LabelProportionsPartitioner(3, [[0.15, 0.85], [0.85, 0.15], [0.5, 0.5]])
        >>> parts = p.split(labels)
        >>> [np.bincount(labels[q], minlength=2).tolist() for q in parts]
        [[10, 56], [56, 10], [33, 33]]
    """

    options = ("proportions",)

    def __init__(self, num_partitions: int, proportions: list[list[float]] | None = None, seed: int = 0) -> None:
        super().__init__(num_partitions, seed)
        if proportions is None:
            raise ValueError(
                "partition.proportions is required for partition.kind=label_proportions, "
                "e.g. [[0.15, 0.85], [0.85, 0.15], [0.5, 0.5]]"
            )
        try:
            props = np.asarray(proportions, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"partition.proportions must be a list of equal-length lists of numbers ({err})") from None
        if props.ndim != 2 or props.shape[0] == 0 or props.shape[1] == 0:
            raise ValueError(
                "partition.proportions must be a non-empty list of lists, e.g. [[0.15, 0.85], [0.85, 0.15]]; "
                f"got shape {props.shape}"
            )
        if not np.isfinite(props).all() or (props < 0).any():
            raise ValueError("partition.proportions has negative or non-finite entries; make all entries >= 0")
        sums = props.sum(axis=1)
        if not np.allclose(sums, 1.0, rtol=0.0, atol=1e-6):
            bad = int(np.argmax(np.abs(sums - 1.0)))
            raise ValueError(f"partition.proportions row {bad} sums to {sums[bad]:.6g}; make every row sum to 1")
        rows, k = props.shape[0], self.num_partitions
        if rows != k and (rows > k or k % rows != 0):
            raise ValueError(
                f"partition.proportions has {rows} rows for train.clients={k}; give {k} rows "
                f"or a number of rows that divides {k} (the pattern repeats cyclically)"
            )
        self.proportions = np.tile(props / sums[:, None], (k // rows, 1))

    def split(self, labels: np.ndarray) -> list[np.ndarray]:
        """Draws each client's class mix from ``labels``; see the class docstring."""
        labels = self._check_labels(labels)
        num_classes = self.proportions.shape[1]
        if labels.max() >= num_classes:
            raise ValueError(
                f"partition.proportions rows have {num_classes} entries but the labels have "
                f"{int(labels.max()) + 1} classes; give one proportion per class"
            )
        available = np.bincount(labels, minlength=num_classes)
        demand = self.proportions.sum(axis=0)
        used = demand > 0
        if (available[used] == 0).any():
            c = int(np.flatnonzero(used & (available == 0))[0])
            raise ValueError(f"class {c} has no training examples; set its entries in partition.proportions to 0")
        # Rounding can let a size a little above the proportional bound fit; start there.
        n = int(np.min(available[used] / demand[used])) + self.num_partitions
        while n > 0:
            counts = _round_rows(n * self.proportions)
            if (counts.sum(axis=0) <= available).all():
                break
            n -= 1
        if n == 0:
            raise ValueError("partition.proportions leave no examples per client; lower train.clients")
        rng = np.random.default_rng(self.seed)
        parts: list[list[np.ndarray]] = [[] for _ in range(self.num_partitions)]
        for c in range(num_classes):
            pool = rng.permutation(np.flatnonzero(labels == c))
            bounds = np.concatenate([[0], np.cumsum(counts[:, c])])
            for i in range(self.num_partitions):
                parts[i].append(pool[bounds[i] : bounds[i + 1]])
        return self._finalize([np.concatenate(p) for p in parts])

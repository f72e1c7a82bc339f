"""The partitioner interface and helpers shared by every partition scheme.

A partitioner turns the label array of a training set into one sorted ``int64`` index
array per client. Each index of the label array is used by at most one client.

Example:
    >>> import numpy as np
    >>> from declora.partition import IidPartitioner, partition_counts
    >>> labels = np.array([0, 1, 0, 1, 0, 1])
    >>> parts = IidPartitioner(num_partitions=2, seed=0).split(labels)
    >>> [len(p) for p in parts]
    [3, 3]
    >>> int(partition_counts(parts, labels).sum())
    6
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class Partitioner(ABC):
    """Splits the example indices of a training set over ``num_partitions`` clients.

    Args:
        num_partitions: Number of clients (config option ``train.clients``), >= 1.
        seed: Seed of every random choice the partitioner makes; same seed, same split.

    Raises:
        ValueError: If ``num_partitions`` < 1 or ``seed`` is not an integer.
    """

    options: ClassVar[tuple[str, ...]] = ()  # the ``partition.*`` keyword options this partitioner reads

    def __init__(self, num_partitions: int, seed: int = 0) -> None:
        if not _is_int(num_partitions) or num_partitions < 1:
            raise ValueError(f"train.clients={num_partitions!r} is invalid; set it to an integer >= 1")
        if not _is_int(seed):
            raise ValueError(f"partition seed={seed!r} is invalid; set partition.seed to an integer or null")
        self.num_partitions = int(num_partitions)
        self.seed = int(seed)

    @abstractmethod
    def split(self, labels: np.ndarray) -> list[np.ndarray]:
        """Assigns example indices to clients.

        Args:
            labels: 1-D array of non-negative integer class labels, one per training example.

        Returns:
            ``num_partitions`` sorted ``int64`` arrays of indices into ``labels``; no index
            appears twice. Whether every index is used depends on the partitioner.

        Raises:
            ValueError: If the labels are malformed or the split is impossible; the message
                names the config option to change.
        """

    def _check_labels(self, labels: np.ndarray) -> np.ndarray:
        """Validates ``labels`` and returns them as a 1-D ``int64`` array."""
        arr = np.asarray(labels)
        if arr.ndim != 1:
            raise ValueError(f"partition labels must be a 1-D array, got shape {arr.shape}; check data.task")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"partition labels must be integers, got dtype {arr.dtype}; check data.task")
        arr = arr.astype(np.int64)
        if arr.size and arr.min() < 0:
            raise ValueError("partition labels must be >= 0; check data.task")
        if arr.size < self.num_partitions:
            raise ValueError(
                f"train.clients={self.num_partitions} exceeds the {arr.size} training examples; "
                "lower train.clients or raise data.max_train_examples"
            )
        return arr

    @staticmethod
    def _finalize(parts: Sequence[Sequence[int] | np.ndarray]) -> list[np.ndarray]:
        """Returns each part as a sorted ``int64`` array."""
        return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_counts(parts: Sequence[np.ndarray], labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Counts the examples of each class held by each client.

    Args:
        parts: One index array per client, as returned by :meth:`Partitioner.split`.
        labels: The label array the indices point into.
        num_classes: Number of classes C; defaults to ``labels.max() + 1``.

    Returns:
        An ``int64`` array of shape (N, C): row i holds client i's per-class counts.

    Example:
        >>> partition_counts([np.array([0, 1]), np.array([2])], np.array([0, 1, 1]))
        array([[1, 1],
               [0, 1]])
    """
    labels = np.asarray(labels, dtype=np.int64)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"labels go up to {int(labels.max())} but num_classes={num_classes}; raise num_classes")
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, part in enumerate(parts):
        counts[i] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return counts

"""IID partitioning: a seeded shuffle cut into equal parts."""

from __future__ import annotations

import numpy as np

from declora.partition.base import Partitioner


class IidPartitioner(Partitioner):
    """Shuffles all examples with ``seed`` and cuts them into ``num_partitions`` equal parts.

    Every example is used exactly once; part sizes differ by at most one (the first
    ``len(labels) % num_partitions`` clients get the extra example). This is what
    ``flwr_datasets.partitioner.IidPartitioner`` does on a shuffled dataset (it takes
    contiguous ``Dataset.shard`` blocks and has no seed of its own), done directly on
    indices with NumPy.

    Args:
        num_partitions: Number of clients (``train.clients``), >= 1.
        seed: Shuffle seed.

    Example:
        >>> import numpy as np
        >>> parts = IidPartitioner(num_partitions=3, seed=0).split(np.zeros(10, dtype=int))
        >>> [len(p) for p in parts]
        [4, 3, 3]
        >>> sorted(np.concatenate(parts).tolist()) == list(range(10))
        True
    """

    def split(self, labels: np.ndarray) -> list[np.ndarray]:
        """Splits ``labels``' indices into equal random parts; see the class docstring."""
        labels = self._check_labels(labels)
        order = np.random.default_rng(self.seed).permutation(labels.size)
        return self._finalize(np.array_split(order, self.num_partitions))

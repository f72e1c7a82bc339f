"""Label-skewed partitioning with per-class Dirichlet proportions (flwr-datasets)."""

from __future__ import annotations

import warnings

import numpy as np

from declora.partition.base import Partitioner, _is_int


class DirichletPartitioner(Partitioner):
    """Splits each class over the clients with proportions drawn from Dirichlet(alpha).

    Wraps ``flwr_datasets.partitioner.DirichletPartitioner`` (``self_balancing=False``):
    for every class a fresh vector p ~ Dir(alpha * 1_N) is drawn and the class's examples
    are cut in those proportions. Every example is used exactly once. Small ``alpha``
    (e.g. 0.1) gives each client few dominant labels; large ``alpha`` (e.g. 1e4) is close
    to IID. The draw is repeated while some client has fewer than ``min_partition_size``
    examples: flwr-datasets redraws up to 11 times per run, and this class starts up to
    ``max_tries`` such runs with seeds derived from ``seed`` before giving up.

    Args:
        num_partitions: Number of clients (``train.clients``), >= 1.
        alpha: Dirichlet concentration (``partition.alpha``), > 0.
        min_partition_size: Fewest examples any client may get
            (``partition.min_partition_size``), >= 0.
        seed: Seed of the Dirichlet draws.
        max_tries: Number of flwr-datasets runs (each redrawing up to 11 times), >= 1.

    Raises:
        ValueError: On invalid arguments, or from :meth:`split` when no draw meets
            ``min_partition_size``.

    Example:
        >>> import numpy as np
        >>> labels = np.random.default_rng(0).integers(0, 2, size=1000)
        >>> parts = DirichletPartitioner(4, alpha=0.5, min_partition_size=10).split(labels)
        >>> sum(len(p) for p in parts), min(len(p) for p in parts) >= 10
        (1000, True)
    """

    options = ("alpha", "min_partition_size")

    def __init__(
        self,
        num_partitions: int,
        alpha: float = 0.5,
        min_partition_size: int = 10,
        seed: int = 0,
        max_tries: int = 10,
    ) -> None:
        super().__init__(num_partitions, seed)
        if not isinstance(alpha, (int, float, np.number)) or not np.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"partition.alpha={alpha!r} is invalid; set it to a finite number > 0")
        if not _is_int(min_partition_size) or min_partition_size < 0:
            raise ValueError(
                f"partition.min_partition_size={min_partition_size!r} is invalid; set it to an integer >= 0"
            )
        if not _is_int(max_tries) or max_tries < 1:
            raise ValueError(f"max_tries={max_tries!r} is invalid; set it to an integer >= 1")
        self.alpha = float(alpha)
        self.min_partition_size = int(min_partition_size)
        self.max_tries = int(max_tries)

    def split(self, labels: np.ndarray) -> list[np.ndarray]:
        """Splits ``labels``' indices with Dirichlet label skew; see the class docstring."""
        import datasets
        from flwr_datasets.partitioner import DirichletPartitioner as FlwrDirichlet

        labels = self._check_labels(labels)
        n, k = labels.size, self.num_partitions
        if self.min_partition_size * k > n:
            raise ValueError(
                f"partition.min_partition_size={self.min_partition_size} x train.clients={k} exceeds the "
                f"{n} training examples; lower partition.min_partition_size to at most {n // k}"
            )
        dataset = datasets.Dataset.from_dict({"label": labels, "_idx": np.arange(n, dtype=np.int64)})
        for attempt in range(self.max_tries):
            attempt_seed = int(np.random.SeedSequence([self.seed, attempt]).generate_state(1)[0])
            flwr = FlwrDirichlet(
                num_partitions=k,
                partition_by="label",
                alpha=self.alpha,
                min_partition_size=self.min_partition_size,
                self_balancing=False,
                shuffle=True,
                seed=attempt_seed,
            )
            flwr.dataset = dataset
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The specified min_partition_size")
                    return self._finalize([flwr.load_partition(i)["_idx"] for i in range(k)])
            except ValueError as err:
                if "max number of attempts" not in str(err):
                    raise
        raise ValueError(
            f"no Dirichlet draw gave every client >= {self.min_partition_size} examples "
            f"(partition.alpha={self.alpha}, {self.max_tries * 11} draws); "
            "raise partition.alpha or lower partition.min_partition_size"
        )

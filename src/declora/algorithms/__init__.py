"""Training algorithms, one strategy per file, selected by ``train.algorithm``."""

from declora.algorithms.base import Algorithm
from declora.algorithms.centralized import Centralized
from declora.algorithms.dec_decaf import DecDeCAF
from declora.algorithms.dec_ffa_lora import DecFFALoRA
from declora.algorithms.dec_lora import DecLoRA
from declora.algorithms.fedavg import FedAvg
from declora.algorithms.hetero_ranks import HETERO_ALGORITHMS
from declora.algorithms.local import LocalOnly
from declora.config import Config

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (DecLoRA, DecFFALoRA, DecDeCAF, FedAvg, Centralized, LocalOnly)
}


def build_algorithm(name: str, cfg: Config | None = None) -> Algorithm:
    """The strategy for ``train.algorithm=name``, configured from ``cfg`` when given."""
    ranks = cfg is not None and cfg.peft.ranks is not None  # heterogeneous ranks: the product-mixing variant
    algorithm = HETERO_ALGORITHMS[name]() if ranks else ALGORITHMS[name]()
    if cfg is not None:
        algorithm.configure(cfg)
    return algorithm


__all__ = ["ALGORITHMS", "Algorithm", "build_algorithm"]

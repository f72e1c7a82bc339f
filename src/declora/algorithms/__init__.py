"""Training algorithms, one strategy per file, selected by ``train.algorithm``."""

from declora.algorithms.base import Algorithm
from declora.algorithms.centralized import Centralized
from declora.algorithms.dec_decaf import DecDeCAF
from declora.algorithms.dec_ffa_lora import DecFFALoRA
from declora.algorithms.dec_lora import DecLoRA
from declora.algorithms.fedavg import FedAvg
from declora.algorithms.local import LocalOnly

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (DecLoRA, DecFFALoRA, DecDeCAF, FedAvg, Centralized, LocalOnly)
}


def build_algorithm(name: str) -> Algorithm:
    """The strategy for ``train.algorithm=name``."""
    return ALGORITHMS[name]()


__all__ = ["ALGORITHMS", "Algorithm", "build_algorithm"]

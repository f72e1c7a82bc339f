"""Communicators: in-process simulation and torch.distributed, behind one interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

from declora.comm.base import Communicator
from declora.comm.inprocess import InProcessCommunicator

if TYPE_CHECKING:
    from declora.config import Config


def build_communicator(cfg: Config, workers: int) -> Communicator:
    """``runtime=simulation``: all ``workers`` clients in this process; ``runtime=distributed``: join the
    torch.distributed process group described by the environment, this process being client ``RANK``."""
    if cfg.runtime == "swarm":  # one peer per process over hivemind (pip install declora[swarm])
        from declora.comm.swarm import SwarmCommunicator

        return SwarmCommunicator(cfg, workers)
    if cfg.runtime == "distributed":
        from declora.comm.distributed import DistributedCommunicator

        return DistributedCommunicator.from_env(workers, cfg.comm, cfg.model.device)
    return InProcessCommunicator(workers)


__all__ = ["Communicator", "InProcessCommunicator", "build_communicator"]

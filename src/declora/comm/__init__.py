"""Communicators: in-process simulation and (later) torch.distributed, behind one interface."""

from declora.comm.base import Communicator
from declora.comm.inprocess import InProcessCommunicator

__all__ = ["Communicator", "InProcessCommunicator"]

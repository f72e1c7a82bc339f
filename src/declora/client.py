"""One client: its trainable tensors, its local optimizer, its data stream, and its K local steps.

A client never holds a model. Its tensors are swapped into the one shared base model for each
forward pass (:func:`declora.models.forward_with`); its optimizer state never leaves it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from declora.config import TrainConfig
from declora.data import BatchStream, TaskData, collate
from declora.models import State, forward_with


class TrainingError(RuntimeError):
    """Training diverged; the message names the round and the client."""


def step_seed(seed: int, round_: int, client: int) -> int:
    """The RNG seed of one client's local steps in one round (dropout), independent of client order."""
    return int(np.random.SeedSequence([seed, round_, client]).generate_state(1)[0])


def make_optimizer(params: list[torch.Tensor], train: TrainConfig) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


@dataclass
class Client:
    """A peer's private state.

    Attributes:
        cid: client id (its node in the graph, its rank under torch.distributed).
        params: name -> leaf tensor; tensors with ``requires_grad`` are trained, the rest stay fixed.
        stream: the client's minibatches over its own partition.
    """

    cid: int
    params: State
    stream: BatchStream
    train_cfg: TrainConfig
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        trained = [p for p in self.params.values() if p.requires_grad]
        self.optimizer = make_optimizer(trained, self.train_cfg)

    @classmethod
    def create(cls, cid: int, init: State, trained: set[str], stream: BatchStream, train_cfg: TrainConfig) -> Client:
        """A client starting from the shared initial adapter ``init`` (copied, never aliased)."""
        params = {n: t.detach().clone().requires_grad_(n in trained) for n, t in init.items()}
        return cls(cid, params, stream, train_cfg)

    def local_steps(self, model: nn.Module, data: TaskData, steps: int, round_: int, device: torch.device) -> float:
        """Take ``steps`` optimizer steps on this client's data; returns the mean training loss."""
        model.train()
        torch.manual_seed(step_seed(self.train_cfg.seed, round_, self.cid))
        trained = [p for p in self.params.values() if p.requires_grad]
        total = 0.0
        for _ in range(steps):
            batch = collate(data.train, self.stream.next(), data.pad_token_id, device)
            loss = forward_with(model, self.params, batch).loss
            if not math.isfinite(loss.item()):
                raise TrainingError(
                    f"loss is {loss.item()} at round {round_}, client {self.cid}; lower train.lr "
                    f"(now {self.train_cfg.lr}) or set train.max_grad_norm"
                )
            loss.backward()
            if self.train_cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trained, self.train_cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            total += loss.item()
        return total / steps

    def state(self) -> State:
        """The tensors this client sends (a detached view; copy before mutating)."""
        return {n: p.detach() for n, p in self.params.items()}

    def set_state(self, state: State) -> None:
        """Overwrite the tensors in place, so the optimizer keeps tracking the same parameters."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state[n])

    def checkpoint(self) -> dict[str, Any]:
        return {
            "params": self.state(),
            "optimizer": self.optimizer.state_dict(),
            "stream": self.stream.state(),
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.set_state(ckpt["params"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.stream.load_state(ckpt["stream"])

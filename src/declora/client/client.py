"""One client: its trainable tensors, its local optimizer, its data stream, and its K local steps.

A client never holds a model. Its tensors are swapped into the one shared base model for each
forward pass (:func:`declora.model.loading.forward_with`); its optimizer state never leaves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from declora.client.guards import check_loss
from declora.client.lr_schedule import make_scheduler
from declora.client.precision import autocast, grad_scaler
from declora.config import TrainConfig
from declora.data.loading import BatchStream, TaskData, collate
from declora.errors import DivergenceError
from declora.model.loading import State, forward_with

TrainingError = DivergenceError  # the former name: training diverged (names round, client and stage)


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
    total_steps: int | None = None  # optimizer steps over the run (the lr schedule's horizon); None = T x K
    optimizer: torch.optim.Optimizer = field(init=False)
    step_losses: list[float] = field(init=False, default_factory=list)  # the last local_steps, per step
    privacy: Any = field(init=False, default=None)  # declora.client.dp_sgd.PeerPrivacy under privacy.mechanism=dp_sgd
    flip_labels: int = field(init=False, default=0)  # byzantine.attack=label_flip: the number of classes C

    def __post_init__(self) -> None:
        trained = [p for p in self.params.values() if p.requires_grad]
        self.optimizer = make_optimizer(trained, self.train_cfg)
        horizon = self.total_steps or self.train_cfg.rounds * self.train_cfg.local_steps
        self.scheduler = make_scheduler(self.optimizer, self.train_cfg, horizon)  # None: constant, no warmup
        self.scaler = grad_scaler(self.train_cfg.mixed_precision)  # pass-through unless fp16

    @classmethod
    def create(
        cls,
        cid: int,
        init: State,
        trained: set[str],
        stream: BatchStream,
        train_cfg: TrainConfig,
        total_steps: int | None = None,
    ) -> Client:
        """A client starting from the shared initial adapter ``init`` (copied, never aliased)."""
        params = {n: t.detach().clone().requires_grad_(n in trained) for n, t in init.items()}
        return cls(cid, params, stream, train_cfg, total_steps)

    def local_steps(self, model: nn.Module, data: TaskData, steps: int, round_: int, device: torch.device) -> float:
        """Take ``steps`` optimizer steps on this client's data; returns the mean training loss."""
        model.train()
        torch.manual_seed(step_seed(self.train_cfg.seed, round_, self.cid))
        trained = [p for p in self.params.values() if p.requires_grad]
        total = 0.0
        accum = self.train_cfg.grad_accumulation
        self.step_losses, micro = [], []  # per optimizer step: the mean of its micro-batch losses
        for k in range(steps * accum):  # accum micro-batches per optimizer step
            batch = collate(data.train, self.stream.next(), data.pad_token_id, device)
            if self.flip_labels:  # a label_flip attacker trains on class C - 1 - y (declora.byzantine.attacks)
                batch["labels"] = (self.flip_labels - 1) - batch["labels"]
            with autocast(self.train_cfg.mixed_precision, device):  # a no-op context for mixed_precision=no
                if self.privacy is None:
                    loss = forward_with(model, self.params, batch).loss
                else:  # DP-SGD: a surrogate whose backward() sets the clipped, noised gradient
                    loss = self.privacy.loss(model, self.params, batch)
            check_loss(loss.item(), round_, self.cid, self.train_cfg.lr)  # DivergenceError on NaN/inf
            self.scaler.scale(loss / accum if accum > 1 else loss).backward()
            total += loss.item()
            micro.append(loss.item())
            if (k + 1) % accum:
                continue  # more micro-batches to accumulate before this optimizer step
            if self.train_cfg.max_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(trained, self.train_cfg.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
            self.step_losses.append(sum(micro[-accum:]) / accum)
        return total / (steps * accum)

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
            **({"scheduler": self.scheduler.state_dict()} if self.scheduler is not None else {}),
            "scaler": self.scaler.state_dict(),  # {} unless fp16
            **({"privacy": self.privacy.state_dict()} if self.privacy is not None else {}),  # accountant
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.set_state(ckpt["params"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.stream.load_state(ckpt["stream"])
        if self.scheduler is not None and "scheduler" in ckpt:  # the lr schedule continues where it was
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):  # fp16 only: the dynamic loss scale continues where it was
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.privacy is not None:  # the epsilon spent so far and the noise stream continue
            self.privacy.load_state_dict(ckpt["privacy"])

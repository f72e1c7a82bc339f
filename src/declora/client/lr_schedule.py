"""Learning-rate schedules of the local optimizers (``train.lr_scheduler``, ``train.warmup_*``).

Each client owns one scheduler over its own optimizer; it steps once per local optimizer step (after
``grad_accumulation`` micro-batches), so a client's learning rate depends only on how many steps *it*
has taken. The schedule spans ``train.rounds x steps per round`` steps (a fedavg client that is not
sampled in a round does not step). Its state goes into the client's checkpoint, so a resumed run
continues the schedule exactly where the interrupted one stopped.

The default (``constant``, no warmup) builds no scheduler at all: the optimizer runs exactly as it did
before schedules existed, bit for bit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from declora.config import TrainConfig


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """``train.warmup_steps``, else ``ceil(train.warmup_ratio * total_steps)`` (HF Trainer's rule)."""
    if train.warmup_steps > 0:
        return train.warmup_steps
    return math.ceil(train.warmup_ratio * total_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int) -> Any | None:
    """The scheduler of one client's optimizer, or None for a constant rate without warmup.

    Args:
        total_steps: optimizer steps this client takes over the whole run (the schedule's horizon).

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR`` from ``transformers.get_scheduler``; call ``step()``
        after every ``optimizer.step()``.
    """
    warmup = warmup_steps(train, total_steps)
    if train.lr_scheduler == "constant" and warmup == 0:
        return None  # keep the plain optimizer: today's numbers, bit for bit
    from transformers import get_scheduler

    # train.lr_scheduler names are transformers' own; "constant" with warmup is its "constant_with_warmup"
    name = "constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))

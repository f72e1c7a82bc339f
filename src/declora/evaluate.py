"""Evaluation: accuracy and loss of a state on the held-out split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from declora.data import TaskData, collate
from declora.models import State, forward_with


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    predictions: np.ndarray  # (n,) predicted label ids, in the order of ``indices``


def length_sorted(data: TaskData, limit: int | None = None) -> np.ndarray:
    """Held-out indices (the first ``limit``, a fixed subset) sorted by length: less padding per batch."""
    n = len(data.eval) if limit is None else min(limit, len(data.eval))
    idx = np.arange(n)
    return idx[np.argsort([len(data.eval.input_ids[i]) for i in idx], kind="stable")]


@torch.no_grad()
def evaluate(
    model: nn.Module, state: State, data: TaskData, indices: np.ndarray, device: torch.device, batch_size: int
) -> EvalResult:
    """Accuracy and mean cross-entropy of the shared model with ``state`` swapped in."""
    model.eval()
    preds, losses = [], []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        out = forward_with(model, state, collate(data.eval, chunk, data.pad_token_id, device))
        preds.append(out.logits.argmax(-1).cpu().numpy())
        losses.append(float(out.loss) * len(chunk))
    pred = np.concatenate(preds)
    accuracy = float((pred == data.eval.labels[indices]).mean())
    return EvalResult(accuracy=accuracy, loss=sum(losses) / len(indices), predictions=pred)

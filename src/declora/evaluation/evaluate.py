"""Evaluation: accuracy and loss of a state on the held-out split.

How a batch is scored is a strategy picked by ``TaskData.scoring``:

=============  ==========================================  ==============================
scoring        accuracy                                    loss
=============  ==========================================  ==============================
classifier     argmax of the head's logits                 cross-entropy, per example
verbalizer     argmax of each label's verbalizer log-lik.  NLL per answer token
answer_tokens  teacher-forced exact match of the answer    NLL per answer token (ppl=exp)
=============  ==========================================  ==============================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from declora.data.loading import TaskData, collate
from declora.evaluation.causal import score_answer_tokens, score_verbalizers
from declora.model.loading import State, forward_with

# (model, state, data, held-out indices, device) -> (predictions, correct, loss summed, loss weight)
Scorer = Callable[[nn.Module, State, TaskData, np.ndarray, torch.device], tuple[np.ndarray, np.ndarray, float, float]]


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
    """Accuracy and mean loss of the shared model with ``state`` swapped in (see the module table)."""
    model.eval()
    score = SCORERS[data.scoring]
    preds, correct, loss, weight = [], [], 0.0, 0.0
    for start in range(0, len(indices), batch_size):
        p, c, loss_sum, w = score(model, state, data, indices[start : start + batch_size], device)
        preds.append(p)
        correct.append(c)
        loss, weight = loss + loss_sum, weight + w
    accuracy = float(np.concatenate(correct).mean())
    return EvalResult(accuracy=accuracy, loss=loss / max(weight, 1.0), predictions=np.concatenate(preds))


def score_classifier(
    model: nn.Module, state: State, data: TaskData, chunk: np.ndarray, device: torch.device
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The head's argmax, and its mean cross-entropy weighted by the batch size."""
    out = forward_with(model, state, collate(data.eval, chunk, data.pad_token_id, device))
    pred = out.logits.argmax(-1).cpu().numpy()
    return pred, pred == data.eval.labels[chunk], float(out.loss) * len(chunk), float(len(chunk))


SCORERS: dict[str, Scorer] = {
    "classifier": score_classifier,
    "verbalizer": score_verbalizers,
    "answer_tokens": score_answer_tokens,
}

"""Divergence is an error, never a result: finite checks at each stage of a round, and a divergence guard.

The trainer calls :class:`Guard` after the local steps (every client's loss and tensors), after the
exchange (every client's tensors) and after evaluation (the averaged model's loss), and before the
final adapters are written. The first non-finite value stops the run with one
:class:`~declora.errors.DivergenceError` line naming the round, the client and the stage; since the
checks run before the round's checkpoint, the last good checkpoint stays the newest one and
``resume=RUN_DIR train.lr=<lower>`` continues from it.

The divergence guard (``train.divergence_factor``, 100 by default) catches a run that explodes while
staying finite (``train.lr=1e4`` on the default task: round 1's mean loss is 9.7e5 with AdamW and 8.0e5
with SGD, against 0.69 before the first update): a client's mean training loss of a round above that
many times its loss before its first update. A healthy run's loss falls below its initial value, so
the default never fires on one; a ratio, not an absolute bound, keeps it independent of the task's
loss scale (ln 2 for SST-2, ~10 for a causal LM's first tokens).

The checks only read tensors (``torch.isfinite``): a healthy run's numbers are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from declora.errors import DivergenceError
from declora.types import State


def fix_hint(lr: float, run_dir: str | Path | None = None) -> str:
    """What to do next, in a few words: lower the lr, and where to go on from (the newest intact round)."""
    fix = f"lower train.lr (now {lr:g}) or set train.max_grad_norm"
    if run_dir is None:
        return f"{fix}; declora train resume=RUN_DIR train.lr=<lower> continues from the last checkpoint"
    from declora.rundir.integrity import newest_intact

    last, _ = newest_intact(run_dir)
    if last == 0:
        return f"{fix} and start again (no checkpoint yet): declora train ... out_dir={run_dir} overwrite=true"
    return f"{fix}; continue from round {last}'s checkpoint: declora train resume={run_dir} train.lr=<lower>"


def check_loss(loss: float, round_: int, client: int | str, lr: float, run_dir: str | Path | None = None) -> None:
    """Raise if a training loss is NaN or infinite.

    Raises:
        DivergenceError: ``round R, client C, stage 'training loss': loss is nan; <fix>``.
    """
    if not math.isfinite(loss):
        raise DivergenceError(
            f"training diverged at round {round_}, client {client}, stage 'training loss': loss is {loss}; "
            + fix_hint(lr, run_dir)
        )


def first_non_finite(state: State) -> str | None:
    """The name of the first tensor of ``state`` holding a NaN or an infinity, else None."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


class Guard:
    """The checks of one run (see the module docstring).

    Args:
        lr: the run's learning rate (named in the fix).
        run_dir: the run directory (named in the fix).
        divergence_factor: stop when a client's mean training loss of a round exceeds this many times its
            initial value (the loss of its first step, before any update; after a resume the run's first
            metrics row); None = off.
        initial_loss: the baseline when resuming (the first metrics row's train_loss), if any.
    """

    def __init__(
        self,
        lr: float,
        run_dir: str | Path | None = None,
        divergence_factor: float | None = None,
        initial_loss: float | None = None,
    ) -> None:
        self.lr, self.run_dir, self.factor = lr, run_dir, divergence_factor
        self.initial: dict[int, float] = {}
        self.resumed_initial = initial_loss

    def _fail(self, round_: int, client: int | str, stage: str, what: str) -> DivergenceError:
        return DivergenceError(
            f"training diverged at round {round_}, client {client}, stage '{stage}': {what}; "
            + fix_hint(self.lr, self.run_dir)
        )

    def states(self, round_: int, states: Mapping[int, State] | Mapping[str, State], stage: str) -> None:
        """Every client's tensors must be finite (stage: 'after local steps', 'after exchange', ...)."""
        for i in sorted(states):
            bad = first_non_finite(states[i])
            if bad is not None:
                raise self._fail(round_, i, stage, f"{bad} is not finite")

    def losses(self, round_: int, losses: Mapping[int, float], clients: Mapping[int, Any] | None = None) -> None:
        """Each client's mean training loss of the round: finite, and under the divergence factor.

        Args:
            clients: the clients, whose ``step_losses[0]`` (the loss before their first optimizer step) is
                the initial value; without it, the client's first mean round loss is.
        """
        for i in sorted(losses):
            loss = float(losses[i])
            if not math.isfinite(loss):
                raise self._fail(round_, i, "training loss", f"mean loss is {loss}")
            if self.factor is None:
                continue
            if i not in self.initial:
                steps = getattr((clients or {}).get(i), "step_losses", None) or [loss]
                self.initial[i] = self.resumed_initial if self.resumed_initial is not None else float(steps[0])
            base = self.initial[i]
            if base > 0 and loss > self.factor * base:
                raise self._fail(
                    round_,
                    i,
                    "divergence guard",
                    f"its training loss grew to {loss:.4g}, more than train.divergence_factor={self.factor:g} "
                    f"times its initial {base:.4g} (train.divergence_factor=null turns this guard off)",
                )

    def evaluation(self, round_: int, eval_loss: float | None) -> None:
        """The averaged model's evaluation loss must be finite."""
        if eval_loss is not None and not math.isfinite(float(eval_loss)):
            raise self._fail(round_, "average", "evaluation loss", f"eval_loss is {eval_loss}")

"""Hooks into the round loop, in the style of Hugging Face's ``TrainerCallback``.

Subclass :class:`Callback` and override the hooks you need (or pass any object with some of these
methods, or a plain function, which is taken as ``on_round_end``)::

    class StopAt(declora.Callback):
        def on_round_end(self, round_, metrics, states, client_metrics):
            return metrics is not None and metrics["accuracy"] >= 0.8   # True stops the run

The trainer calls them on every process (under ``runtime=distributed`` each sees its own clients;
trackers log on rank 0 only). A stop asked for by any process stops all of them after the same
round, which is then checkpointed, so ``resume=RUN_DIR`` can continue a stopped run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from declora.client.client import Client
    from declora.comm import Communicator
    from declora.config import Config
    from declora.training.result import RunResult
    from declora.types import State


class Callback:
    """Base class of round-loop hooks; every hook is optional and the defaults do nothing."""

    def on_train_begin(self, cfg: Config, run_dir: Path) -> None:
        """Once, after setup and before round 1 (on resume: before the first round still to do)."""

    def on_round_end(
        self,
        round_: int,
        metrics: dict[str, Any] | None,
        states: dict[int, State],
        client_metrics: dict[int, dict[str, Any]],
    ) -> bool | None:
        """After every round's communication and evaluation, before its checkpoint.

        Args:
            round_: the round just finished (1-based).
            metrics: the row written to ``metrics.jsonl`` (averaged model); None on rounds that
                ``eval.every`` skips.
            states: client id -> its trainable tensors (read-only views: copy before changing).
            client_metrics: client id -> ``train_loss`` (mean of its local steps), ``step_losses`` (one
                per optimizer step) and, on evaluated rounds, ``client_accuracy`` and
                ``squared_distance`` (to the mean). Clients that did not train this round have no
                ``train_loss``.

        Returns:
            True to stop the run after this round.
        """
        return None

    def on_train_end(self, result: RunResult) -> None:
        """Once, after the adapters and ``summary.json`` are written."""


class _FunctionCallback(Callback):
    """A plain function ``f(round_, metrics, states)`` used as ``on_round_end``."""

    def __init__(self, fn: Callable[..., bool | None]) -> None:
        self.on_round_end = fn  # type: ignore[method-assign]


def _takes_client_metrics(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` accepts a 4th argument (hooks written as ``(round_, metrics, states)`` do not)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return True
    return len(params) >= 4 or any(p.name == "client_metrics" for p in params)


class CallbackList:
    """The user's callbacks plus the run's trackers, called in that order.

    Args:
        callbacks: Callback objects, objects with some of its methods, or functions.
        trackers: the ``report_to`` trackers this process logs to (the trainer builds them: rank 0 only).
        active: whether any process has a callback or tracker; the same on every rank (unlike the
            trackers themselves), so the stop vote is a collective all processes join.
    """

    def __init__(
        self, callbacks: Iterable[Any] | None, trackers: Iterable[Callback] = (), active: bool = False
    ) -> None:
        self.callbacks = [_FunctionCallback(c) if inspect.isroutine(c) else c for c in callbacks or []]
        self.active = bool(self.callbacks) or active
        self.callbacks += list(trackers)

    def _each(self, hook: str) -> Iterable[Callable[..., Any]]:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                yield fn

    def train_begin(self, cfg: Config, run_dir: Path) -> None:
        for fn in self._each("on_train_begin"):
            fn(cfg, Path(run_dir))

    def round_end(
        self,
        round_: int,
        metrics: dict[str, Any] | None,
        clients: dict[int, Client],
        losses: dict[int, float],
        local: dict[int, dict[str, Any]],
        comm: Communicator,
    ) -> bool:
        """Call every ``on_round_end``; True when any callback on any process asked to stop."""
        if not self.active:
            return False
        states = {i: c.state() for i, c in clients.items()}
        per_client: dict[int, dict[str, Any]] = {}
        for i, c in clients.items():
            info: dict[str, Any] = {"step_losses": list(c.step_losses) if i in losses else []}
            if i in losses:
                info["train_loss"] = losses[i]
            per_client[i] = info | local.get(i, {})
        stop = False
        for fn in self._each("on_round_end"):
            args = (round_, metrics, states, per_client) if _takes_client_metrics(fn) else (round_, metrics, states)
            stop = bool(fn(*args)) or stop  # every callback runs, even after one asked to stop
        return comm.total(1.0 if stop else 0.0) > 0

    def train_end(self, summary: dict[str, Any], history: list[dict[str, Any]], cfg: Config) -> RunResult:
        """Build the run's :class:`~declora.training.result.RunResult`; call every ``on_train_end`` with it."""
        from declora.training.result import RunResult

        result = RunResult(summary, list(history), Path(summary["run_dir"]), cfg)
        for fn in self._each("on_train_end"):
            fn(result)
        return result

"""Experiment trackers (``report_to``): TensorBoard, MLflow and Weights & Biases as callbacks.

Each logs, on rank 0 only:

* the resolved config (TensorBoard: a text panel; MLflow: params, dotted keys; W&B: the run config);
* every numeric value of each ``metrics.jsonl`` row at step = round (``accuracy``, ``eval_loss``,
  ``consensus_error``, ``bytes_sent``, ``client_accuracy_mean`` ... and whatever later rows add);
* each client's accuracy and mean training loss per round (``client_accuracy/client_<i>``,
  ``client_train_loss/client_<i>``);
* the training loss of every local optimizer step, averaged over the clients
  (``train/step_loss``, step = ``(round - 1) x steps per round + k``);
* at the end, the summary's numbers (``summary/<key>``) and, where the tracker stores files (MLflow,
  W&B), the averaged adapter, ``summary.json`` and ``config.yaml``.

The tracker's package is imported only when it is used; each is an extra:
``pip install declora[tensorboard]`` (``[mlflow]``, ``[wandb]``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from declora.errors import ConfigError
from declora.rundir.layout import AVERAGE, CONFIG, SUMMARY, adapter_dir
from declora.training.callbacks import Callback

if TYPE_CHECKING:
    from declora.config import Config
    from declora.training.result import RunResult
    from declora.types import State

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def numbers(row: dict[str, Any] | None, prefix: str = "") -> dict[str, float]:
    """The finite int/float values of ``row`` (None, bools, strings and lists are left out)."""
    out: dict[str, float] = {}
    for key, value in (row or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix + key] = float(value)
    return out


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as ``{"train.clients": 10, ...}``."""
    from omegaconf import OmegaConf

    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return out


class Tracker(Callback):
    """What every tracker logs each round, expressed as ``(name, value, step)`` scalars."""

    def round_scalars(
        self, round_: int, metrics: dict[str, Any] | None, client_metrics: dict[int, dict[str, Any]]
    ) -> tuple[dict[str, float], list[tuple[int, float]]]:
        """Per-round scalars (step = round) and the per-step training losses ``(global_step, loss)``."""
        scalars = numbers(metrics)
        for i, info in sorted(client_metrics.items()):
            if info.get("client_accuracy") is not None:
                scalars[f"client_accuracy/client_{i}"] = float(info["client_accuracy"])
            if info.get("train_loss") is not None:
                scalars[f"client_train_loss/client_{i}"] = float(info["train_loss"])
        runs = [info["step_losses"] for info in client_metrics.values() if info.get("step_losses")]
        steps: list[tuple[int, float]] = []
        if runs:
            n = min(len(r) for r in runs)
            steps = [((round_ - 1) * n + k + 1, sum(r[k] for r in runs) / len(runs)) for k in range(n)]
        return scalars, steps


class TensorBoardTracker(Tracker):
    """Event files under ``<run>/tensorboard`` (``tensorboard --logdir runs``); no artifacts."""

    def on_train_begin(self, cfg: Config, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from declora.config import to_yaml

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```yaml\n" + to_yaml(cfg) + "```")  # rendered as Markdown

    def on_round_end(
        self, round_: int, metrics: dict[str, Any] | None, states: dict[int, State], client_metrics: dict
    ) -> None:
        scalars, steps = self.round_scalars(round_, metrics, client_metrics)
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, round_)
        for step, loss in steps:
            self.writer.add_scalar("train/step_loss", loss, step)
        self.writer.flush()  # a crashed run keeps the rounds it finished

    def on_train_end(self, result: RunResult) -> None:
        for name, value in numbers(result.summary, "summary/").items():
            self.writer.add_scalar(name, value, int(result.summary["rounds"]))
        self.writer.close()


class MLflowTracker(Tracker):
    """An MLflow run (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``), or the active one if any."""

    def on_train_begin(self, cfg: Config, run_dir: Path) -> None:
        import mlflow

        self.mlflow = mlflow
        self.own = mlflow.active_run() is None  # log into the caller's run when there is one
        if self.own:
            mlflow.start_run(run_name=run_dir.name)
        params = {k: str(v)[:6000] for k, v in flat_config(cfg).items()}  # MLflow's limit per value
        mlflow.log_params(params)
        mlflow.set_tag("declora.run_dir", str(run_dir))

    def on_round_end(
        self, round_: int, metrics: dict[str, Any] | None, states: dict[int, State], client_metrics: dict
    ) -> None:
        scalars, steps = self.round_scalars(round_, metrics, client_metrics)
        if scalars:
            self.mlflow.log_metrics(scalars, step=round_)
        for step, loss in steps:
            self.mlflow.log_metric("train/step_loss", loss, step=step)

    def on_train_end(self, result: RunResult) -> None:
        self.mlflow.log_metrics(numbers(result.summary, "summary/"))
        adapter = adapter_dir(result.run_dir, AVERAGE)
        if adapter.is_dir():
            self.mlflow.log_artifacts(str(adapter), "adapter")
        for name in (SUMMARY, CONFIG):
            if (result.run_dir / name).is_file():
                self.mlflow.log_artifact(str(result.run_dir / name))
        if self.own:
            self.mlflow.end_run()


class WandbTracker(Tracker):
    """A W&B run (``WANDB_PROJECT``, default ``declora``; ``WANDB_MODE=offline`` needs no account)."""

    def on_train_begin(self, cfg: Config, run_dir: Path) -> None:
        import wandb
        from omegaconf import OmegaConf

        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "declora"),
            name=run_dir.name,
            dir=str(run_dir),
            config=OmegaConf.to_container(OmegaConf.structured(cfg)),
        )
        # Two x axes: rounds for the per-round numbers, global local steps for the step losses.
        self.run.define_metric("round")
        self.run.define_metric("train/global_step")
        self.run.define_metric("train/step_loss", step_metric="train/global_step")

    def on_round_end(
        self, round_: int, metrics: dict[str, Any] | None, states: dict[int, State], client_metrics: dict
    ) -> None:
        scalars, steps = self.round_scalars(round_, metrics, client_metrics)
        for name in scalars:
            self.run.define_metric(name, step_metric="round")
        for step, loss in steps:
            self.run.log({"train/global_step": step, "train/step_loss": loss})
        self.run.log({"round": round_, **scalars})

    def on_train_end(self, result: RunResult) -> None:
        self.run.summary.update(numbers(result.summary, "summary/"))
        adapter = adapter_dir(result.run_dir, AVERAGE)
        if adapter.is_dir():
            artifact = self.wandb.Artifact(f"adapter-{result.run_dir.name}", type="model")
            artifact.add_dir(str(adapter))
            artifact.add_file(str(result.run_dir / SUMMARY))
            self.run.log_artifact(artifact)
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


def check_trackers(names: list[str]) -> None:
    """Stop before training when a tracker's package is missing (cheap: nothing is imported)."""
    for name in names:
        if name != "none" and importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"report_to={name} needs the {PACKAGES[name]} package: pip install 'declora[{name}]'")


def build_trackers(names: list[str]) -> list[Tracker]:
    """One tracker per name of ``report_to`` ("none" is skipped)."""
    check_trackers(names)
    return [TRACKERS[n]() for n in names if n != "none"]

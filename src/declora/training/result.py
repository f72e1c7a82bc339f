"""What a run takes besides its config (:class:`Inputs`) and what it gives back (:class:`RunResult`).

They live here, not in the :mod:`declora.api` facade, so the trainer and the callbacks can use them
without importing the facade (which imports the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from declora.errors import ConfigError
from declora.rundir import layout

if TYPE_CHECKING:
    import torch
    from torch import nn

    from declora.config import Config

__all__ = ["Inputs", "RunResult"]


@dataclass
class Inputs:
    """Objects used instead of files and paths (all optional).

    Attributes:
        splits: ``{"train": Dataset, "eval": Dataset}``; read instead of ``data.path``, then subsampled,
            label-mapped, tokenized and partitioned exactly as files are.
        model: a transformers model (``AutoModelForSequenceClassification`` for ``model.task_type=seq_cls``,
            ``AutoModelForCausalLM`` for ``causal_lm``), wrapped with peft in place.
        tokenizer: its tokenizer; None = loaded from ``model.name_or_path``.
    """

    splits: dict[str, Any] | None = None
    model: Any = None
    tokenizer: Any = None


@dataclass
class RunResult:
    """What a run produced: its numbers, its directory and its adapters.

    Attributes:
        summary: the contents of ``summary.json``.
        history: the rows of ``metrics.jsonl`` (one per evaluated round).
        run_dir: the run directory.
        config: the resolved config the run used.
    """

    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path = Path(".")
    config: Config | None = None

    @property
    def final_accuracy(self) -> float:
        """Accuracy of the averaged model after the last round."""
        return self.summary["final_accuracy"]

    @property
    def stopped_early(self) -> bool:
        """Whether a callback stopped the run before ``train.rounds``."""
        return self.config is not None and self.summary["rounds"] < self.config.train.rounds

    def adapter_dir(self, adapter: str | int = "average") -> Path:
        """``adapters/average`` or ``adapters/client_<i>`` (``adapter`` = "average", i or "client_<i>")."""
        name = layout.client_adapter(adapter) if isinstance(adapter, int) else adapter
        path = layout.adapter_dir(self.run_dir, name)
        if not path.is_dir():
            raise ConfigError(f"{path}: no such adapter (runs with save_adapters=false keep none)")
        return path

    def adapter_state(self, adapter: str | int = "average") -> dict[str, torch.Tensor]:
        """The saved tensors of one adapter, keyed as peft saves them (``...lora_A.weight``, the head)."""
        from safetensors.torch import load_file

        path = self.adapter_dir(adapter)
        files = sorted(path.glob("*.safetensors"))  # adapter_model.safetensors, or head.safetensors (head_only)
        if not files:
            raise ConfigError(f"{path}: no .safetensors file")
        return {k: v for f in files for k, v in load_file(str(f)).items()}

    def average_state(self) -> dict[str, torch.Tensor]:
        """The averaged model's adapter (what the run evaluated), as a state dict."""
        return self.adapter_state("average")

    def client_state(self, i: int) -> dict[str, torch.Tensor]:
        """Client ``i``'s own adapter after the last round, as a state dict."""
        return self.adapter_state(i)

    def load_model(self, adapter: str | int = "average", base: nn.Module | None = None) -> nn.Module:
        """The base model with a saved adapter loaded: a ``peft.PeftModel`` (``head_only``: the base).

        Args:
            adapter: "average", a client id, or "client_<i>".
            base: the base model to load into (required when the run was given a model object);
                None = loaded from ``model.name_or_path`` as the run loaded it.
        """
        from declora.model.loading import load_base
        from declora.quiet import quiet_libraries

        path = self.adapter_dir(adapter)
        if base is None and self.config is None:
            raise ConfigError("RunResult.load_model: this result has no config; pass base=")
        if base is None:
            with quiet_libraries():  # no load report for the head that the adapter replaces
                base = load_base(self.config.model, len(self.summary["label_names"]))
        if (path / layout.HEAD_WEIGHTS).is_file():  # head_only: no peft wrapper
            from safetensors.torch import load_file

            keys = base.load_state_dict(load_file(str(path / layout.HEAD_WEIGHTS)), strict=False)
            if keys.unexpected_keys:
                raise ConfigError(f"{path}: head tensors {keys.unexpected_keys[:3]} do not fit this base model")
            return base
        from peft import PeftModel

        with quiet_libraries():
            return PeftModel.from_pretrained(base, str(path))

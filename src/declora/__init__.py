"""declora: decentralized LoRA fine-tuning of language models (Dec-LoRA).

Peers train LoRA adapters on one shared frozen base model and average them with their graph
neighbours (gossip) instead of sending them to a server. Importing this package has no side effects;
the heavy libraries load when a name below is first used (module-level ``__getattr__``).

Example:
    >>> import declora
    >>> result = declora.train(["train.clients=4", "train.rounds=3"], out_dir="runs/demo")  # doctest: +SKIP
    >>> result.final_accuracy, result.run_dir  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; imported on first access
_LAZY: dict[str, str] = {
    # running
    "train": "declora.api",
    "resolve_config": "declora.api",
    "RunResult": "declora.api",
    "Callback": "declora.training.callbacks",
    "read_metrics": "declora.rundir.layout",
    # configuration
    "load_config": "declora.config",
    "to_yaml": "declora.config",
    "config_help": "declora.config",
    "Config": "declora.config",
    "ModelConfig": "declora.config",
    "PeftConfig": "declora.config",
    "DataConfig": "declora.config",
    "PartitionConfig": "declora.config",
    "TopologyConfig": "declora.config",
    "TrainConfig": "declora.config",
    "EvalConfig": "declora.config",
    "CommConfig": "declora.config",
    # graphs and data splits
    "Topology": "declora.mixing.topology",
    "Partitioner": "declora.partition",
    "IidPartitioner": "declora.partition",
    "DirichletPartitioner": "declora.partition",
    "LabelProportionsPartitioner": "declora.partition",
    "ShardPartitioner": "declora.partition",
    "build_partitioner": "declora.partition",
    "partition_counts": "declora.partition",
    # errors
    "DecloraError": "declora.errors",
    "ConfigError": "declora.errors",
    "DataError": "declora.errors",
    "CheckpointError": "declora.errors",
    "DivergenceError": "declora.errors",
    "PeerError": "declora.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'declora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

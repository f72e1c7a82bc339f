"""Typed run configuration: nested dataclasses, YAML files and dotted overrides (OmegaConf).

Every field carries its help text in ``metadata["help"]`` (shown by ``declora train --help-config``).
Validation lives in ``__post_init__`` and raises :class:`ConfigError` with one line that names the
option to change, so a bad input stops before any model is loaded.

Example:
    >>> cfg = load_config(overrides=["train.clients=4", "topology.kind=complete"])
    >>> cfg.train.clients, cfg.topology.kind
    (4, 'complete')
"""

from declora.config.byzantine import ByzantineConfig
from declora.config.comm import CommConfig
from declora.config.data import DataConfig
from declora.config.eval import EvalConfig
from declora.config.loading import config_help, load_config, to_yaml
from declora.config.model import ModelConfig
from declora.config.partition import PartitionConfig
from declora.config.peft import PeftConfig
from declora.config.privacy import PrivacyConfig
from declora.config.root import Config
from declora.config.swarm import SwarmConfig
from declora.config.topology import TopologyConfig
from declora.config.train import TrainConfig
from declora.errors import ConfigError

__all__ = [
    "ByzantineConfig",
    "CommConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "PartitionConfig",
    "PeftConfig",
    "PrivacyConfig",
    "SwarmConfig",
    "TopologyConfig",
    "TrainConfig",
    "config_help",
    "load_config",
    "to_yaml",
]

"""Set-up: everything a run needs before its first round, cheapest checks first.

graph -> data (tokenized once) -> partition -> one frozen base + PEFT -> clients. Bad input fails
here, before any training; the algorithm is built once by the caller and handed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from declora.algorithms import Algorithm, build_algorithm
from declora.byzantine.report import poison_labels
from declora.client.client import Client
from declora.client.dp_sgd import attach as attach_privacy
from declora.client.precision import check_mixed_precision
from declora.config import Config, ConfigError
from declora.data.causal import load_causal_task
from declora.data.checks import check_partition, check_proportions
from declora.data.grouping import token_lengths
from declora.data.loading import BatchStream, TaskData, load_task
from declora.data.validation import check_validation_split, load_validation
from declora.mixing.topology import Topology
from declora.model.loading import (
    build_model,
    gguf_file_of,
    load_tokenizer,
    resolve_model_path,
    select_device,
    trainable_state,
)
from declora.model.quantized import check_quantization, hide_bnb_cpu_notice
from declora.partition import partitioner_from_config
from declora.training.result import Inputs


@dataclass
class Setup:
    """Everything a run needs before its first round."""

    cfg: Config
    algorithm: Algorithm
    topology: Topology | None
    data: TaskData
    parts: list[np.ndarray]  # training indices of each worker
    model: nn.Module
    init: dict[str, torch.Tensor]  # the shared initial trainable state
    device: torch.device
    validation: TaskData | None = None  # data.validation_split: picks best_round (declora.data.validation)
    tokenizer: Any = None  # saved beside adapters/average and adapters/best


def build_topology(cfg: Config, algorithm: Algorithm) -> Topology | None:
    """The run's graph and W, or None for algorithms without one (centralized, local, fedavg)."""
    return Topology.from_config(cfg.topology, cfg.train.clients, cfg.train.seed) if algorithm.uses_graph else None


def partitioner_split(cfg: Config, labels: np.ndarray) -> list[np.ndarray]:
    """Each client's training indices under ``partition.*`` (a ConfigError names a bad option)."""
    try:
        return partitioner_from_config(cfg.partition, cfg.train.clients, cfg.train.seed).split(labels)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def setup(cfg: Config, inputs: Inputs | None = None, *, algorithm: Algorithm | None = None) -> Setup:
    """Validate and build everything, cheapest checks first, so bad input fails before any training.

    Args:
        algorithm: the run's algorithm, built once by the caller (None: built here from ``train.algorithm``).
        inputs: datasets, model and tokenizer objects used instead of ``data.path``/``model.name_or_path``.
    """
    inputs = inputs or Inputs()
    algorithm = algorithm or build_algorithm(cfg.train.algorithm, cfg)
    hide_bnb_cpu_notice(cfg.model.quantization != "none")  # before peft imports bitsandbytes
    if inputs.model is None:
        resolve_model_path(cfg.model.name_or_path, gguf_file_of(cfg.model))  # a bad path fails before data is read
    check_quantization(cfg.model, select_device(cfg.model.device))  # bitsandbytes present and working
    check_mixed_precision(cfg.train.mixed_precision, select_device(cfg.model.device))  # bf16/fp16 supported here
    topology = build_topology(cfg, algorithm)
    check_validation_split(cfg, inputs.splits)  # a split the data lacks stops before it is read

    tokenizer = load_tokenizer(cfg.model, inputs.tokenizer)
    load = load_causal_task if cfg.model.task_type == "causal_lm" else load_task  # prompt + answer tokens
    data = load(cfg.data, tokenizer, cfg.model.max_length, seed=cfg.train.seed, given=inputs.splits)
    workers = algorithm.workers(cfg.train)
    check_proportions(cfg.partition.kind, cfg.partition.proportions, data.label_names, data.source)
    parts = partitioner_split(cfg, data.train.labels)
    if workers < len(parts):  # pooled (centralized): one model on the union of the clients' data
        parts = [np.sort(np.concatenate(parts))]
    check_partition(parts, cfg.partition)  # an empty client stops before the model loads

    model = build_model(cfg.model, cfg.peft, data.num_labels, seed=cfg.train.seed, base=inputs.model)
    init = trainable_state(model)  # the same starting adapter and head for every client
    algorithm.set_initial_state(init)
    model.requires_grad_(False)  # the shared module is frozen: clients hold the trainable copies
    validation = None if inputs.splits else load_validation(cfg, tokenizer, data.label_names)
    device = next(model.parameters()).device
    return Setup(cfg, algorithm, topology, data, parts, model, init, device, validation, tokenizer)


def make_clients(s: Setup, local_ids: list[int]) -> dict[int, Client]:
    """The local clients: each its own copy of the trainable state, optimizer, lr schedule and data stream."""
    trained = {n for n in s.init if s.algorithm.is_trained(n)}
    lengths = token_lengths(s.data.train.input_ids) if s.cfg.data.group_by_length else None
    clients = {
        i: Client.create(
            i,
            s.algorithm.client_init(i, s.init),  # s.init itself unless peft.ranks gives peers their own rank
            trained,
            BatchStream(s.parts[i], s.cfg.train.batch_size, s.cfg.train.seed, i, lengths),
            s.cfg.train,
            total_steps=s.cfg.train.rounds * s.algorithm.steps_per_round(s.cfg.train),  # lr schedule horizon
        )
        for i in local_ids
    }
    poison_labels(s.cfg, clients, s.data.num_labels)  # byzantine.attack=label_flip: attackers' flipped labels
    return attach_privacy(s.cfg, s.algorithm, s.parts, clients)  # privacy.mechanism=dp_sgd: DP-SGD per peer

"""``train.*``: the local steps — algorithm, clients, rounds, K, batch, optimizer, lr schedule, churn options."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from declora.config.fields import _SCHEDULERS, _choice, _f, _fraction, _int_at_least, _positive, _seed
from declora.errors import ConfigError


@dataclass
class TrainConfig:
    algorithm: str = _f(
        "dec_lora",
        "dec_lora; dec_ffa_lora (LoRA A frozen at its shared init); dec_decaf (mix products B A, "
        "re-factor by truncated SVD); fedavg (a server averages); centralized (pooled data, same samples); "
        "or local.",
    )
    clients: int = _f(10, "Number of peers N.")
    rounds: int = _f(15, "Communication rounds T; 0 = evaluate the initial model only (zero-shot), as round 0.")
    local_steps: int = _f(5, "Local optimizer steps K per round.")
    batch_size: int = _f(32, "Examples per local step (per client).")
    lr: float = _f(1e-3, "Learning rate (the paper's 1e-3).")
    optimizer: str = _f("adamw", "adamw or sgd; its state stays local to each client.")
    weight_decay: float = _f(0.0, "Decoupled weight decay (adamw) or L2 (sgd).")
    momentum: float = _f(0.0, "SGD momentum.")
    max_grad_norm: float | None = _f(None, "Clip each local step's gradient norm; null = no clipping.")
    seed: int = _f(0, "Seeds the adapter init, data order, partition and graph.")
    mixed_precision: str = _f(
        "no",
        "Autocast the local steps' forward pass: no, bf16 (CUDA with bf16, or a CPU with AVX512-BF16/AMX) or "
        "fp16 (CUDA only, with loss scaling). Adapters and optimizer state stay float32; evaluation is float32.",
    )
    clients_per_round: int | None = _f(
        None, "fedavg: clients sampled (seeded, per round) to train and send; null = all of them."
    )
    divergence_factor: float | None = _f(
        100.0,
        "Divergence guard: stop (exit 1, last good checkpoint kept, no adapter written) when a client's mean "
        "training loss of a round exceeds this many times its initial value (the loss of its first step, "
        "before any update). 100 (default) lets healthy runs through, whose loss falls, and stops a run that "
        "exploded but stayed finite (e.g. train.lr=1e4); null = off (non-finite values always stop).",
    )
    peer_dropout: float = _f(
        0.0,
        "Probability in [0, 1) that each peer is offline in a round (no local steps, sends and receives "
        "nothing, keeps its state); drawn per round from train.seed.",
    )
    availability_file: str | None = _f(
        None,
        "YAML or CSV schedule of offline peers per round (entries {rounds: 5-8, offline: 0-4}; rounds '4-' "
        "= from round 4 on, for good); see declora.config.availability.",
    )
    stragglers: float = _f(
        0.0, "Probability in [0, 1] that an online peer straggles in a round: it takes only straggler_steps of K."
    )
    straggler_steps: float = _f(
        0.5, "Fraction in (0, 1] of train.local_steps a straggler finishes (at least one step)."
    )
    lr_scheduler: str = _f(
        "constant",
        "Per-client learning-rate schedule over its rounds x local_steps optimizer steps (transformers' "
        "get_scheduler): constant, linear, cosine, cosine_with_restarts, polynomial, inverse_sqrt.",
    )
    warmup_steps: int = _f(0, "Linear warmup over this many local optimizer steps (overrides warmup_ratio).")
    warmup_ratio: float = _f(0.0, "Linear warmup over this fraction of the schedule's steps, in [0, 1).")
    grad_accumulation: int = _f(
        1,
        "Micro-batches per optimizer step: each local step averages the gradients of this many batches of "
        "train.batch_size examples (so it sees batch_size x grad_accumulation examples).",
    )
    batch_clients: bool | str = _f(
        False,
        "Run the simulated clients' local steps together: one forward/backward over their concatenated "
        "batches through the shared base, each client's LoRA factors and head applied to its own rows, its "
        "own loss, gradient, clipping and optimizer step (same numbers up to float rounding). false (one "
        "client after another), true, or auto (true where supported, else false).",
    )
    clients_per_pass: int | None = _f(
        None,
        "train.batch_clients: at most this many clients in one forward pass; null = passes of up to 2,048 "
        "padded tokens on a CPU (larger ones fall out of cache), 32,768 on a GPU. Clients of similar batch "
        "width share a pass (a pass pads every batch to its widest).",
    )

    def __post_init__(self) -> None:
        _choice(
            "train.algorithm",
            self.algorithm,
            ("dec_lora", "dec_ffa_lora", "dec_decaf", "fedavg", "centralized", "local"),
        )
        if self.clients_per_round is not None:
            if self.algorithm != "fedavg":
                raise ConfigError("train.clients_per_round applies to train.algorithm=fedavg only; set it to null")
            if not 1 <= self.clients_per_round <= self.clients:
                raise ConfigError(
                    f"train.clients_per_round={self.clients_per_round} must be in 1..train.clients={self.clients}"
                )
        _choice("train.optimizer", self.optimizer, ("adamw", "sgd"))
        _choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        for name in ("clients", "rounds", "local_steps", "batch_size"):
            if getattr(self, name) < (0 if name == "rounds" else 1):
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= {0 if name == 'rounds' else 1}")
        _positive("train.lr", self.lr)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        if not (math.isfinite(self.momentum) and 0.0 <= self.momentum < 1.0):
            raise ConfigError(f"train.momentum={self.momentum} must be in [0, 1) (SGD momentum; 0 = none)")
        if self.max_grad_norm is not None:
            _positive("train.max_grad_norm", self.max_grad_norm)  # a negative norm would flip the gradient
        _seed("train.seed", self.seed)
        factor = self.divergence_factor
        if factor is not None and not (math.isfinite(factor) and factor > 1):
            raise ConfigError(
                f"train.divergence_factor={self.divergence_factor} must be a number > 1 (e.g. 10) or null (off)"
            )
        _fraction("train.peer_dropout", self.peer_dropout, one=False)
        _fraction("train.stragglers", self.stragglers)
        if not 0.0 < self.straggler_steps <= 1.0:
            raise ConfigError(f"train.straggler_steps={self.straggler_steps} must be in (0, 1]")
        if self.availability_file is not None:
            from declora.config.availability import load_schedule

            load_schedule(self.availability_file, self.clients)  # a bad schedule stops here, before any model
        _choice("train.lr_scheduler", self.lr_scheduler, _SCHEDULERS)
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            raise ConfigError("train.warmup_steps and train.warmup_ratio are alternatives: set one of them to 0")
        if self.grad_accumulation < 1:
            raise ConfigError(f"train.grad_accumulation={self.grad_accumulation} must be >= 1")
        _choice("train.batch_clients", self.batch_clients, (False, True, "auto"))
        _int_at_least("train.clients_per_pass", self.clients_per_pass, 1, optional=True)


def batch_clients_refusal(cfg: Any) -> str | None:
    """Why ``train.batch_clients`` cannot run with the whole config ``cfg`` (None: it can)."""
    reasons = {
        "runtime=simulation (one process, many clients)": cfg.runtime != "simulation",
        "privacy.mechanism=none (DP-SGD's per-example gradients run one client at a time)": cfg.privacy.mechanism
        != "none",
        "peft.ranks unset (one rank for every client)": cfg.peft.ranks is not None,
        "model.task_type=seq_cls": cfg.model.task_type != "seq_cls",
        "model.quantization=none": cfg.model.quantization != "none",
        "peft.method=lora or head_only": cfg.peft.method not in ("lora", "head_only"),
    }
    need = next((need for need, bad in reasons.items() if bad), None)
    return None if need is None else f"train.batch_clients=true needs {need}: set train.batch_clients=false"


def check_batch_clients(cfg: Any) -> None:
    """``train.batch_clients=true`` refused, before the model loads, where it cannot run (auto falls back)."""
    reason = batch_clients_refusal(cfg) if cfg.train.batch_clients is True else None
    if reason is not None:
        raise ConfigError(reason)

"""``topology.*``, ``train.*``, ``eval.*`` and ``comm.*``: the graph, the local steps, evaluation and gossip."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from declora.config.fields import _SCHEDULERS, _choice, _f, _fraction, _int_at_least, _positive, _seed
from declora.errors import ConfigError


@dataclass
class TopologyConfig:
    kind: str = _f("ring", "Graph: ring, erdos_renyi, complete, star, torus, grid, edge_list.")
    mixing: str = _f("laplacian", "laplacian (I - 2L/(3 lambda_max), the paper's), metropolis, or max_degree.")
    p: float = _f(0.5, "Edge probability for erdos_renyi (resampled until connected).")
    rows: int | None = _f(None, "Rows of a torus/grid; null = the most square factorisation.")
    edges_file: str | None = _f(None, "Whitespace-separated 'i j' edge list for kind=edge_list.")
    seed: int | None = _f(None, "Graph seed; null = train.seed.")
    link_drop: float = _f(
        0.0, "Probability in [0, 1] that each edge of the graph fails in a round (drawn per round from train.seed)."
    )
    dynamic_mixing: str = _f(
        "diagonal",
        "W_t on a round's live graph: diagonal (a failed edge's weight moves onto both ends' diagonal; "
        "computable by each peer alone) or metropolis (Metropolis weights of the live graph).",
    )

    def __post_init__(self) -> None:
        _fraction("topology.link_drop", self.link_drop)
        _choice("topology.dynamic_mixing", self.dynamic_mixing, ("diagonal", "metropolis"))
        _choice(
            "topology.kind",
            self.kind,
            ("ring", "erdos_renyi", "complete", "star", "torus", "grid", "edge_list"),
        )
        _choice("topology.mixing", self.mixing, ("laplacian", "metropolis", "max_degree"))
        if not 0.0 < self.p <= 1.0:
            raise ConfigError(f"topology.p={self.p} must be in (0, 1]")
        _int_at_least("topology.rows", self.rows, 1, optional=True)
        _seed("topology.seed", self.seed)
        if self.kind == "edge_list" and not self.edges_file:
            raise ConfigError("topology.edges_file is required for topology.kind=edge_list")


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


@dataclass
class EvalConfig:
    every: int = _f(1, "Evaluate every this many rounds (the last round is always evaluated).")
    clients: bool = _f(True, "Also evaluate every client's own model (mean/min/max accuracy).")
    client_max_examples: int | None = _f(
        100, "Evaluate clients on a fixed subset of the held-out set (speed); null = all of it."
    )
    batch_size: int = _f(128, "Examples per evaluation batch.")

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"eval.every={self.every} must be >= 1")
        _int_at_least("eval.batch_size", self.batch_size, 1)
        _int_at_least("eval.client_max_examples", self.client_max_examples, 1, optional=True)


@dataclass
class CommConfig:
    timeout_s: float = _f(
        300.0,
        "runtime=distributed: seconds a rank waits for a peer in any send/receive/collective before it "
        "stops, naming the missing peer and the round (must exceed a round's local steps + evaluation).",
    )
    init_method: str = _f(
        "env://",
        "runtime=distributed rendezvous: env:// (torchrun sets MASTER_ADDR/MASTER_PORT), "
        "tcp://HOST:PORT, or file:///shared/path (RANK and WORLD_SIZE come from the environment).",
    )
    startup_timeout_s: float = _f(
        1800.0, "runtime=distributed: seconds ranks wait for each other to join and load data and model."
    )
    backend: str = _f("auto", "runtime=distributed: auto (nccl when the model is on CUDA, else gloo), gloo, nccl.")
    bits: int = _f(
        32,
        "Bits per gossiped value: 32 (exact), 16 (float16), or 8, 4, 2 (symmetric uniform quantization, "
        "codes packed into bytes; 2 = ternary). Neighbours receive the quantized message; the sender's own "
        "copy stays exact.",
    )
    scale: str = _f("tensor", "Quantization scale (bits <= 8): one per tensor, or one per row of each matrix.")
    rounding: str = _f(
        "nearest",
        "nearest, or stochastic (unbiased, seeded from train.seed). Use nearest with error_feedback: "
        "stochastic 2-bit is not a contraction and CHOCO diverges with it.",
    )
    error_feedback: bool = _f(
        False,
        "CHOCO-gossip (Koloskova et al. 2019): send Q(x - x_hat) against public copies x_hat, so compression "
        "error is re-sent instead of lost; the clients' mean is preserved exactly.",
    )
    consensus_step: float = _f(
        1.0,
        "CHOCO's gamma in (0, 1]: x_i += gamma * sum_j W_ij (x_hat_j - x_hat_i). 1.0 = plain gossip when "
        "nothing is lost; lower it (e.g. 0.5) if 2-bit gossip oscillates.",
    )
    robust: str = _f(
        "none",
        "Byzantine-robust mixing of what a peer received (declora.mixing.robust): none (plain gossip), "
        "clipped_gossip (x_i + sum_j W_ij clip(x_j - x_i, tau)), trimmed_mean or median (coordinate-wise).",
    )
    robust_radius: float | None = _f(
        None,
        "clipped_gossip's tau (> 0, on the norm of the whole state difference); null = adaptive: the "
        "second-largest neighbour distance each round (He et al. 2022's reference rule).",
    )
    robust_trim: int = _f(1, "trimmed_mean: values dropped at each end per coordinate (lowered if too few peers).")
    robust_exclude: bool = _f(
        False,
        "Stop mixing a neighbour this peer has flagged as a suspect (a local W_t change, as a failed link: "
        "its weight moves to the diagonal).",
    )

    def __post_init__(self) -> None:
        _choice("comm.bits", self.bits, (32, 16, 8, 4, 2))
        _choice("comm.scale", self.scale, ("tensor", "row"))
        _choice("comm.rounding", self.rounding, ("nearest", "stochastic"))
        if not 0.0 < self.consensus_step <= 1.0:
            raise ConfigError(f"comm.consensus_step={self.consensus_step} must be in (0, 1]")
        _positive("comm.timeout_s", self.timeout_s)
        _positive("comm.startup_timeout_s", self.startup_timeout_s)
        _choice("comm.backend", self.backend, ("auto", "gloo", "nccl"))
        _choice("comm.robust", self.robust, ("none", "clipped_gossip", "trimmed_mean", "median"))
        if self.robust_radius is not None:
            _positive("comm.robust_radius", self.robust_radius)
        _int_at_least("comm.robust_trim", self.robust_trim, 0)
        if not self.init_method.startswith(("env://", "tcp://", "file://")):
            raise ConfigError(f"comm.init_method={self.init_method!r}: use env://, tcp://HOST:PORT or file:///PATH")

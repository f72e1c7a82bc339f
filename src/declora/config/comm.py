"""``comm.*``: how tensors move and are mixed (compression, CHOCO, robust rules, timeouts)."""

from __future__ import annotations

from dataclasses import dataclass

from declora.config.fields import _choice, _f, _int_at_least, _positive
from declora.errors import ConfigError


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

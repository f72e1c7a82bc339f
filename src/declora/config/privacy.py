"""``privacy.*``: per-peer differential privacy (DP-SGD with Opacus accounting)."""

from __future__ import annotations

from dataclasses import dataclass

from declora.config.fields import _choice, _f, _int_at_least, _positive
from declora.errors import ConfigError


@dataclass
class PrivacyConfig:
    mechanism: str = _f(
        "none",
        "none, or dp_sgd: every peer clips each example's gradient of its trainable tensors to max_grad_norm and "
        "adds Gaussian noise (declora.client.dp_sgd); epsilon per peer goes to metrics.jsonl and summary.json.",
    )
    max_grad_norm: float = _f(1.0, "dp_sgd: per-example clipping bound C (L2 over all trained tensors jointly).")
    clipping: str = _f(
        "flat",
        "dp_sgd: flat (each example's gradient over all trained tensors clipped to C), or per_group: the head "
        "(modules_to_save) clipped to C*sqrt(head_clip_share) and the adapters to C*sqrt(1-head_clip_share), "
        "the same sensitivity C (declora.client.dp_clipping).",
    )
    head_clip_share: float = _f(
        0.5, "dp_sgd with clipping=per_group: the head's share of C^2 (0 < share < 1); the adapters get the rest."
    )
    noise_multiplier: float | None = _f(
        None, "dp_sgd: sigma (noise std = sigma * C per coordinate); or null and set privacy.target_epsilon."
    )
    target_epsilon: float | None = _f(
        None, "dp_sgd: the epsilon each peer may spend over the run's planned steps; sigma is derived from it."
    )
    delta: float = _f(1e-5, "dp_sgd: delta of the (epsilon, delta) guarantee; keep it below 1 / a peer's examples.")
    poisson: bool = _f(
        True,
        "dp_sgd: Poisson sampling (each example in each step with probability batch_size / peer examples), "
        "which the accountant assumes; false = shuffled fixed-size batches, accounted as if Poisson.",
    )
    accountant: str = _f("rdp", "dp_sgd: Opacus accountant, rdp (Renyi DP) or prv (tighter, slower).")
    physical_batch_size: int | None = _f(
        None,
        "dp_sgd: examples per forward/backward pass; a drawn (logical) batch runs in chunks of at most this many, "
        "then is noised and accounted once (memory of a chunk, noise of the batch); null = the whole batch at once.",
    )
    secure_rng: bool = _f(
        False,
        "dp_sgd: draw noise and batches from OS entropy (not reproducible) instead of train.seed; a guarantee "
        "against anyone who may know the config needs true.",
    )

    def __post_init__(self) -> None:
        _choice("privacy.mechanism", self.mechanism, ("none", "dp_sgd"))
        _choice("privacy.accountant", self.accountant, ("rdp", "prv"))
        _choice("privacy.clipping", self.clipping, ("flat", "per_group"))
        if not 0.0 < self.head_clip_share < 1.0:
            raise ConfigError(f"privacy.head_clip_share={self.head_clip_share} must be in (0, 1), e.g. 0.5")
        _positive("privacy.max_grad_norm", self.max_grad_norm)
        _int_at_least("privacy.physical_batch_size", self.physical_batch_size, 1, optional=True)
        if self.noise_multiplier is not None:
            _positive("privacy.noise_multiplier", self.noise_multiplier, allow_zero=True)
        if self.target_epsilon is not None:
            _positive("privacy.target_epsilon", self.target_epsilon)
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.delta={self.delta} must be in (0, 1), e.g. 1e-5")
        sigma, target = self.noise_multiplier is not None, self.target_epsilon is not None
        if self.mechanism == "none" and (sigma or target or self.physical_batch_size is not None):
            raise ConfigError(
                "privacy.noise_multiplier/target_epsilon/physical_batch_size need privacy.mechanism=dp_sgd; set it"
            )
        if self.mechanism == "dp_sgd" and sigma == target:
            raise ConfigError("privacy.mechanism=dp_sgd: set exactly one of privacy.noise_multiplier, target_epsilon")

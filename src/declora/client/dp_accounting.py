"""The privacy accounting of DP-SGD (declora.client.dp_sgd): Opacus' accountants, epsilon, and sigma for a target.

Every DP step of a peer is one Poisson-subsampled Gaussian mechanism with ``(sigma, q)``; Opacus'
``RDPAccountant`` or ``PRVAccountant`` composes them.
"""

from __future__ import annotations

import warnings
from typing import Any

from declora.config import ConfigError, PrivacyConfig


def accountant(name: str) -> Any:
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=name)


def epsilon_of(accountant: Any, delta: float) -> float:
    """Epsilon spent so far (0 before any step; infinite for a step without noise)."""
    if not accountant.history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in accountant.history):
        return float("inf")
    with warnings.catch_warnings():  # RDP warns when the best order is at the end of its grid
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def calibrate(cfg: PrivacyConfig, q: float, steps: int) -> float:
    """``privacy.noise_multiplier``, or the sigma that spends at most ``target_epsilon`` in ``steps``."""
    if cfg.noise_multiplier is not None:
        return cfg.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    assert cfg.target_epsilon is not None
    try:
        with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha" at large sigmas
            warnings.simplefilter("ignore")
            return float(
                get_noise_multiplier(
                    target_epsilon=cfg.target_epsilon,
                    target_delta=cfg.delta,
                    sample_rate=q,
                    steps=max(steps, 1),
                    accountant=cfg.accountant,
                )
            )
    except ValueError:
        raise ConfigError(f"privacy.target_epsilon={cfg.target_epsilon} cannot be reached: raise it") from None

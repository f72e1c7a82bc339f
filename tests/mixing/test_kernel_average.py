"""Averaging many clients block by block equals the float64 mean (declora.mixing.kernel.average_states;
from test_throughput.py)."""

from __future__ import annotations

import torch


def test_average_of_many_clients_is_blocked_but_equal() -> None:
    from declora.mixing.kernel import AVERAGE_BLOCK, average_states

    g = torch.Generator().manual_seed(0)
    states = [
        {"a": torch.randn(6, 5, generator=g), "b": torch.randn(3, generator=g)} for _ in range(3 * AVERAGE_BLOCK + 7)
    ]
    mean = average_states(states)
    for name in ("a", "b"):
        reference = torch.stack([s[name].double() for s in states]).mean(0).float()
        assert torch.allclose(mean[name], reference, atol=1e-7, rtol=0)
        assert mean[name].dtype == torch.float32

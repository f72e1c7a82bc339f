"""Mixed precision for the trainable path (``train.mixed_precision``): autocast, loss scaling, refusals.

``no`` changes nothing (no autocast context at all, so runs stay bit for bit). ``bf16`` autocasts the
forward pass (matmuls in bfloat16, adapters and optimizer state stay float32) on CUDA GPUs that support
bfloat16 and on CPUs with native bfloat16 instructions (AVX512-BF16 or AMX); elsewhere it is emulated
and slower than float32, so it is refused. ``fp16`` is CUDA only and scales the loss
(``torch.amp.GradScaler``) so small gradients do not underflow. Evaluation stays in float32.

Example:
    >>> with autocast("no", torch.device("cpu")):
    ...     torch.ones(2, 2) @ torch.ones(2, 2)
    tensor([[2., 2.],
            [2., 2.]])
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from declora.errors import ConfigError

MODES = ("no", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles), as torch reports it."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def check_mixed_precision(mode: str, device: torch.device) -> None:
    """Refuse a ``train.mixed_precision`` the device cannot run fast (called before the model loads).

    Raises:
        ConfigError: one line naming the option and what to set instead.
    """
    if mode == "no":
        return
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.mixed_precision=fp16 needs a CUDA GPU (device is {device.type}); use bf16 or no")
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.mixed_precision=bf16: this GPU has no bfloat16 support; use fp16 or no")
        if device.type == "cpu" and not cpu_has_native_bf16():
            raise ConfigError(
                "train.mixed_precision=bf16: this CPU has no AVX512-BF16/AMX (bf16 would be emulated, slower "
                "than fp32); set train.mixed_precision=no"
            )
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"train.mixed_precision=bf16 runs on cpu or cuda, not {device.type}; set it to no")


def autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of ``mode`` on ``device`` (a no-op context for ``no``)."""
    if mode == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[mode])


def grad_scaler(mode: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for ``fp16`` only; disabled, its methods pass through unchanged
    (``scale(loss)`` is ``loss``, ``step(opt)`` is ``opt.step()``), so the training loop has one shape."""
    return torch.amp.GradScaler("cuda", enabled=mode == "fp16")

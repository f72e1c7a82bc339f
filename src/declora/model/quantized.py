"""A quantized frozen base model (QLoRA-style) through transformers' ``BitsAndBytesConfig``.

``model.quantization`` = nf4 / fp4 (4-bit, bitsandbytes ``Linear4bit``) or int8 (``Linear8bitLt``)
replaces the base's linear layers; the LoRA adapters and the task head stay in full precision (the
head is kept out of quantization, since peft trains a copy of it). bitsandbytes >= 0.48 runs all three
on CPU as well as on CUDA.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from declora.config import ConfigError, ModelConfig

# Modules never quantized: task heads (trained through peft's modules_to_save) of BERT-, RoBERTa- and
# decoder-style classifiers. Each name is given twice: as a plain name (substring / suffix matching of
# older transformers) and as ``.*name`` (prefix-regex matching of transformers >= 5).
HEAD_MODULES = ("classifier", "pooler", "score")


def skip_modules(extra: Iterable[str] = ()) -> list[str]:
    """``llm_int8_skip_modules`` patterns for the heads plus ``extra`` module names."""
    names = sorted(set(HEAD_MODULES) | set(extra))
    return names + [f".*{n}" for n in names]


def bnb_config(model_cfg: ModelConfig, keep: Iterable[str] = ()) -> Any:
    """The ``BitsAndBytesConfig`` for ``model.quantization`` (None for ``none``).

    Args:
        model_cfg: uses ``quantization`` and ``dtype`` (the 4-bit compute dtype).
        keep: further module names to leave unquantized (e.g. ``peft.modules_to_save``).
    """
    if model_cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = skip_modules(keep)
    if model_cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    compute = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_cfg.quantization,
        bnb_4bit_compute_dtype=compute[model_cfg.dtype],
        llm_int8_skip_modules=skip,
    )


BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_CPU_NOTICE = "Failed to load CPU gemm_4bit_forward"


class _DropBnbCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_CPU_NOTICE)


def hide_bnb_cpu_notice(quantized: bool) -> None:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward" warning when the base is not quantized.

    peft imports bitsandbytes whenever it is installed, and on a CPU with AVX512-BF16 bitsandbytes then
    logs that its optional ``kernels`` package is missing: noise for a run without a 4-bit layer. Only
    that message is dropped (a filter on its logger, installed before the import), and only when
    ``quantized`` is false. :func:`declora.model.loading.build_model` calls it before wrapping the base
    with peft, so every command (train, eval, predict, export) and the Python API are covered.
    """
    logger = logging.getLogger(BNB_CPU_LOGGER)
    for f in [f for f in logger.filters if isinstance(f, _DropBnbCpuNotice)]:
        logger.removeFilter(f)
    if not quantized:
        logger.addFilter(_DropBnbCpuNotice())


def check_quantization(model_cfg: ModelConfig, device: torch.device) -> None:
    """Stop before training when bitsandbytes is missing or cannot run the layer type on ``device``.

    Runs one tiny quantized linear layer forward on ``device`` (milliseconds).

    Raises:
        ConfigError: one line naming ``model.quantization`` and the fix.
    """
    q = model_cfg.quantization
    if q == "none":
        return
    fix = f"model.quantization={q}: install bitsandbytes>=0.48 (pip install 'declora[quant]') or set none"
    try:
        import bitsandbytes as bnb
    except Exception as err:  # ImportError, or a broken native library
        raise ConfigError(f"{fix} ({type(err).__name__}: {err})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if q == "int8":
                layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False, threshold=6.0)
            else:
                layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type=q, compute_dtype=torch.float32)
            layer = layer.to(device)
            out = layer(torch.ones(2, 64, device=device))
        if not torch.isfinite(out).all():
            raise RuntimeError("non-finite output")
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{fix}: bitsandbytes {bnb.__version__} cannot run it on {device} ({first})") from None


def keep_4bit_layers_trainable(model: nn.Module) -> None:
    """Stop bitsandbytes (>= 0.49) repacking 4-bit weights for CPU inference on an eval-mode pass.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` converts its weight once, in place, to an
    inference-only layout whenever the module is in eval mode and the input needs no grad (our
    evaluation, and the first frozen layers of every training step). That layout has no backward, so
    the next training step fails inside ``matmul_4bit``. We keep the base in eval mode (no dropout, as
    the averaged model is evaluated), so we switch the conversion off; the matmul is the same.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quiet_bitsandbytes() -> None:
    """Silence the per-call 'inputs will be cast to float16' warning of int8 matmuls."""
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


def _quant_state_tensors(state: Any) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes ``QuantState`` (absmax, code, offset, nested state)."""
    out = [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
    if getattr(state, "state2", None) is not None:
        out += _quant_state_tensors(state.state2)
    return out


def base_model_bytes(model: nn.Module, exclude: Iterable[str] = ()) -> int:
    """Bytes of the frozen base: parameters (packed 4/8-bit codes where quantized), their quantization
    constants (absmax / SCB) and buffers, without the trainable tensors named in ``exclude``."""
    skip = set(exclude)
    total = 0
    for name, p in model.named_parameters():
        if name in skip:
            continue
        total += p.numel() * p.element_size()
        quant_state = getattr(p, "quant_state", None)
        if quant_state is not None:
            total += sum(t.numel() * t.element_size() for t in _quant_state_tensors(quant_state))
        scb = getattr(p, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total

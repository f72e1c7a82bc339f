"""bitsandbytes' CPU kernel notice is hidden for unquantized bases, before peft imports it
(declora.model.quantized.hide_bnb_cpu_notice; from test_trust.py)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from declora.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


def test_the_kernel_notice_is_hidden_before_the_model_is_built(
    tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import declora.training.setup

    calls: list[Any] = []

    def built(*args: Any, **kwargs: Any) -> None:
        calls.append("build_model")
        raise KeyboardInterrupt  # stop setup here

    monkeypatch.setattr(declora.training.setup, "hide_bnb_cpu_notice", lambda quantized: calls.append(quantized))
    monkeypatch.setattr(declora.training.setup, "build_model", built)
    with pytest.raises(KeyboardInterrupt):
        declora.training.setup.setup(load_config(overrides=tiny_overrides))
    assert calls == [False, "build_model"]  # not quantized: hidden, before peft imports bitsandbytes


def test_bitsandbytes_imported_after_the_filter_prints_no_notice() -> None:
    code = "from declora.model.quantized import hide_bnb_cpu_notice as h; h(False); import bitsandbytes"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if "No module named 'bitsandbytes'" in proc.stderr:
        pytest.skip("bitsandbytes is not installed")
    assert proc.returncode == 0 and "gemm_4bit_forward" not in proc.stderr, proc.stderr[-1000:]


def test_the_notice_filter_is_only_installed_for_unquantized_bases() -> None:
    import logging

    from declora.model.quantized import BNB_CPU_LOGGER, BNB_CPU_NOTICE, hide_bnb_cpu_notice

    logger = logging.getLogger(BNB_CPU_LOGGER)
    record = logging.LogRecord(BNB_CPU_LOGGER, logging.WARNING, "x", 1, BNB_CPU_NOTICE + " from %s", ("k",), None)
    other = logging.LogRecord(BNB_CPU_LOGGER, logging.WARNING, "x", 1, "something else", (), None)
    try:
        hide_bnb_cpu_notice(False)
        assert not logger.filter(record) and logger.filter(other)
        hide_bnb_cpu_notice(True)
        assert logger.filter(record)
    finally:
        hide_bnb_cpu_notice(True)

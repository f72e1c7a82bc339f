"""The command line's error handling: ``--debug`` / ``DECLORA_DEBUG`` show the traceback (from test_trust.py)."""

from __future__ import annotations

import pytest

from declora.cli.app import main
from declora.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="train.lr"):
        main(["--debug", "train", "train.lr=nan"])
    with pytest.raises(ConfigError, match="train.lr"):
        main(["train", "--debug", "train.lr=nan"])  # anywhere on the line
    monkeypatch.setenv("DECLORA_DEBUG", "1")
    with pytest.raises(ConfigError, match="train.lr"):
        main(["train", "train.lr=nan"])

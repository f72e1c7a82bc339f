"""One kind of user error: the DecloraError family and its exit codes (from test_trust.py)."""

from __future__ import annotations

import pytest

from declora.config import ConfigError
from declora.errors import DataError, DecloraError, DivergenceError, PeerError

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


def test_the_error_family_and_exit_codes() -> None:
    from declora.client.client import TrainingError
    from declora.comm.distributed import PeerFailure

    failure = PeerFailure(2, 3, 0, "exchange", "reset")
    assert isinstance(failure, PeerError) and isinstance(failure, RuntimeError) and failure.exit_code == 1
    assert TrainingError is DivergenceError and DivergenceError("x").exit_code == 1
    assert issubclass(DataError, DecloraError) and DataError("x").exit_code == 2
    assert ConfigError("x").exit_code == 2

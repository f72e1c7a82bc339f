"""One switch for the libraries' chatter: datasets/transformers progress bars, load reports, FutureWarnings.

:func:`quiet_libraries` silences them as soon as it is called. Used as a context manager
(``with quiet_libraries(): ...``, the Python API) it restores the previous settings on exit; called
as a plain function (the command line, a swarm peer) the silence lasts for the process. Our own
progress bar and messages are not affected.
"""

from __future__ import annotations

import warnings
from types import TracebackType


class _Quiet:
    """The settings in force before :func:`quiet_libraries`; restored by ``__exit__``."""

    def __init__(self) -> None:
        import datasets
        import transformers

        self._bars = datasets.is_progress_bar_enabled(), transformers.logging.is_progress_bar_enabled()
        self._verbosity = transformers.logging.get_verbosity()
        self._warnings = warnings.catch_warnings()  # saves the filters; restored by __exit__
        self._warnings.__enter__()
        datasets.disable_progress_bars()
        transformers.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        import datasets
        import transformers

        transformers.logging.set_verbosity(self._verbosity)
        if self._bars[0]:
            datasets.enable_progress_bars()
        if self._bars[1]:
            transformers.logging.enable_progress_bar()
        self._warnings.__exit__(None, None, None)


def quiet_libraries() -> _Quiet:
    """Silence datasets/transformers progress bars, load reports and FutureWarnings now.

    Returns:
        a context manager that restores the previous settings when its ``with`` block ends (ignore it
        to keep the libraries quiet for the rest of the process).
    """
    return _Quiet()

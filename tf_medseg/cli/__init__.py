"""tf_medseg's command-line programs (thin absl entry points, one module each).

This package's own import is kept light: ``tf-medseg-train``'s console script starts at
:func:`train`, which handles Ctrl-C and SIGTERM before the training module's imports (absl, NumPy,
the configuration: a third of a second on a loaded machine), so that a signal in that time ends
the program with one line instead of a ``KeyboardInterrupt`` traceback.
"""

from __future__ import annotations

import os
import signal


def _exit_before_start(signum, frame) -> None:
    os.write(2, b"tf-medseg-train: interrupted outside training; nothing to save\n")
    os._exit(130)


def handle_signals_from_the_start() -> None:
    """Outside ``tf-medseg-train``'s own handlers (imports, exit) Ctrl-C or SIGTERM end the
    process quietly, with exit status 130."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_before_start)


def train() -> None:
    """The ``tf-medseg-train`` console script."""
    handle_signals_from_the_start()
    from tf_medseg.cli.train import run

    run()

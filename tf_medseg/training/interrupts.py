"""Ctrl-C and SIGTERM for a training run: the first stops cleanly, the second exits at once.

Python turns SIGINT into a ``KeyboardInterrupt`` raised at whatever bytecode the main thread runs
next. During training that can be anywhere: inside TensorFlow's context managers, a cache swap
half done, or a ``__del__`` method, where CPython reports the exception as "ignored" and goes on
training as if nothing had happened. So while the loop runs, :class:`Interrupts` only records the
signal, and the loop stops at its next check (after the step, between validation windows) with a
checkpoint. Before the loop (imports, preprocessing, the cache fill) there is nothing to save and
the first signal raises ``KeyboardInterrupt`` as usual.

A second signal exits the process at once with status 130 and no checkpoint, even while the main
thread is blocked inside TensorFlow: a watchdog thread reads the signals from
``signal.set_wakeup_fd``, which the interpreter writes to from its C-level handler, so it does
not depend on the main thread reaching Python code. If the run has not stopped ``grace_s``
seconds after the first signal, the watchdog prints every thread's stack (for a bug report) and
exits 130.

SIGTERM, which batch schedulers (SLURM, Kubernetes) send before killing a job, is handled as a
first Ctrl-C.

Before the loop the first signal must not be raised inside a finalizer (a ``__del__`` that the
garbage collector runs, such as TensorFlow's checkpoint objects', or a ``weakref.finalize``):
CPython would print "Exception ignored" with a traceback and go on as if nothing had happened.
The handler sees such a frame on the stack and raises nothing there, and ``sys.unraisablehook``
catches the exception if it was raised in a finalizer the handler did not recognise. In both
cases the watchdog raises the signal again through ``_thread.interrupt_main`` 10 ms later, until
it lands outside a finalizer (and does not count it as a second signal).
"""

from __future__ import annotations

import _thread
import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
import weakref

#: The exit status of a run ended by a signal, as shells report one ended by SIGINT.
EXIT_INTERRUPTED = 130

_HANDLED = (signal.SIGINT, signal.SIGTERM)
_AGAIN = 0  # the byte that asks the watchdog to raise the first signal again
_RETRY_S = 0.01


class TrainingInterrupted(KeyboardInterrupt):
    """The run was asked to stop by SIGINT or SIGTERM (raised at a safe point of the loop)."""


class Interrupts:
    """Records SIGINT and SIGTERM for one run; see the module docstring.

    Use from the main thread::

        with Interrupts() as interrupts:
            ...                              # a signal here raises KeyboardInterrupt
            with interrupts.deferred():
                ...                          # here it is recorded; call interrupts.check()

    Args:
        grace_s: Seconds after the first signal before the watchdog gives up on a clean stop,
            prints the threads' stacks and exits (0: never).
        stream: Where the watchdog writes (default: the process's stderr, fd 2).
    """

    def __init__(self, grace_s: float = 120.0, stream=None):
        self.grace_s = float(grace_s)
        self.signum: int | None = None
        self._stream = stream
        self._defer = 0
        self._count = 0  # signals seen by the watchdog
        self._echoes = 0  # signals raised again by the watchdog (not the user's)
        self._again = False  # the first signal is still to be raised outside a finalizer
        self._previous_hook = None
        self._first_at: float | None = None
        self._previous: dict[int, object] = {}
        self._previous_fd = -1
        self._pipe: tuple[int, int] | None = None
        self._watchdog: threading.Thread | None = None
        self._closing = threading.Event()

    # ------------------------------------------------------------------ state
    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def reason(self) -> str:
        name = signal.Signals(self.signum).name if self.signum else "no signal"
        return f"interrupted by {name}"

    def check(self) -> None:
        """Raises :class:`TrainingInterrupted` if a signal arrived (call at safe points)."""
        if self.signum is not None:
            raise TrainingInterrupted(self.reason())

    @contextlib.contextmanager
    def deferred(self):
        """Within this block a signal is only recorded (see :meth:`check`)."""
        self._defer += 1
        try:
            yield self
        finally:
            self._defer -= 1

    # ------------------------------------------------------------------ install
    def install(self) -> Interrupts:
        """Installs the handlers and starts the watchdog (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        for signum in _HANDLED:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        self._watchdog = threading.Thread(
            target=self._watch, name="interrupt-watchdog", daemon=True
        )
        self._watchdog.start()
        return self

    def uninstall(self) -> None:
        """Restores the previous handlers and stops the watchdog."""
        if self._pipe is None:
            return
        # First: the watchdog raises no signal again (through interrupt_main) once the previous
        # handlers are back.
        self._closing.set()
        signal.set_wakeup_fd(self._previous_fd)
        sys.unraisablehook = self._previous_hook
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        os.close(self._pipe[1])  # the watchdog's read returns b""
        self._watchdog.join(timeout=5)
        os.close(self._pipe[0])
        self._pipe = None

    def __enter__(self) -> Interrupts:
        return self.install()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.uninstall()

    # ------------------------------------------------------------------ handlers
    def _handle(self, signum: int, frame) -> None:
        # Runs in the main thread between bytecodes. Records the first signal; raises only
        # outside deferred blocks. (The second signal is the watchdog's: it exits at once.)
        if self.signum is not None and not self._again:
            return
        self.signum = self.signum or signum
        self._again = False
        if self._defer:
            return
        if _in_finalizer(frame):
            self._raise_later()
            return
        raise KeyboardInterrupt(self.reason())

    def _unraisable(self, unraisable) -> None:
        # Our KeyboardInterrupt, lost in a finalizer _in_finalizer did not recognise.
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and self.signum is not None:
            self._raise_later()
            return
        self._previous_hook(unraisable)

    def _raise_later(self) -> None:
        self._again = True
        with contextlib.suppress(OSError, TypeError):
            os.write(self._pipe[1], bytes([_AGAIN]))

    def _say(self, text: str) -> None:
        stream = self._stream or sys.stderr
        try:
            stream.write(f"tf-medseg-train: {text}\n")
            stream.flush()
        except (OSError, ValueError):
            pass

    def _watch(self) -> None:
        read_fd = self._pipe[0]
        while not self._closing.is_set():
            deadline = None
            if self._first_at is not None and self.grace_s > 0:
                deadline = self._first_at + self.grace_s
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._again:
                timeout = _RETRY_S if timeout is None else min(timeout, _RETRY_S)
            if not _readable(read_fd, timeout):
                if self._closing.is_set():
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    self._say(
                        f"the run did not stop within {self.grace_s:g} s of the interrupt; the "
                        "threads' stacks follow; exiting without a checkpoint"
                    )
                    faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
                    os._exit(EXIT_INTERRUPTED)
                if self._again:
                    # The main thread was in a finalizer: raise the first signal again.
                    self._echoes += 1
                    _thread.interrupt_main(self.signum)
                continue
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in _HANDLED:
                    continue
                if self._echoes:
                    self._echoes -= 1
                    continue
                self._count += 1
                if self._count == 1:
                    self._first_at = time.monotonic()
                else:
                    self._say("second interrupt: exiting now, without a checkpoint")
                    os._exit(EXIT_INTERRUPTED)


def _in_finalizer(frame) -> bool:
    """Whether ``frame`` runs inside a ``__del__`` or a ``weakref.finalize`` callback."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or code is weakref.finalize.__call__.__code__:
            return True
        frame = frame.f_back
    return False


def _readable(fd: int, timeout: float | None) -> bool:
    import select

    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)

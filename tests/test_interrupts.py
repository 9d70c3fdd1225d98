"""Ctrl-C and SIGTERM handling (tf_medseg.training.interrupts): recorded, not raised, while the
loop runs; raised before it; a second signal or an expired grace period ends the process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tf_medseg.training.interrupts import EXIT_INTERRUPTED, Interrupts, TrainingInterrupted


def _deliver(signum: int) -> None:
    """Sends ``signum`` to this process and lets the main thread run its Python handler."""
    os.kill(os.getpid(), signum)
    for _ in range(100):
        time.sleep(0.01)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_deferred_is_recorded_and_raised_at_the_check(signum):
    before = signal.getsignal(signum)
    with Interrupts(grace_s=0) as interrupts:
        with interrupts.deferred():
            _deliver(signum)  # no exception here
            assert interrupts.requested
            assert signal.Signals(signum).name in interrupts.reason()
            with pytest.raises(TrainingInterrupted):
                interrupts.check()
    assert signal.getsignal(signum) is before, "uninstall restores the previous handler"


def test_outside_a_deferred_block_the_first_signal_raises_keyboard_interrupt():
    with Interrupts(grace_s=0) as interrupts:
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)
        assert interrupts.requested, "recorded too, in case the exception is swallowed"


def test_without_a_signal_check_passes():
    with Interrupts(grace_s=0) as interrupts, interrupts.deferred():
        interrupts.check()
        assert not interrupts.requested


_BLOCKED_MAIN_THREAD = textwrap.dedent(
    """
    import sys, time
    from tf_medseg.training.interrupts import Interrupts
    with Interrupts(grace_s=float(sys.argv[1])) as interrupts, interrupts.deferred():
        print("ready", flush=True)
        time.sleep(60)  # never reaches a check, as a main thread stuck in TensorFlow
    print("slept through", flush=True)
    """
)


def _blocked_process(grace_s: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_MAIN_THREAD, str(grace_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_second_signal_exits_at_once_while_the_main_thread_is_blocked():
    proc = _blocked_process(grace_s=0)
    try:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "the first signal only asks for a stop"
        start = time.time()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED
    assert time.time() - start < 5
    assert "second interrupt" in stderr


def test_a_run_that_does_not_stop_within_the_grace_period_prints_stacks_and_exits():
    proc = _blocked_process(grace_s=1.0)
    try:
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED
    assert 0.9 < time.time() - start < 10
    assert "did not stop within 1 s" in stderr
    assert "time.sleep" in stderr or "in <module>" in stderr, "the threads' stacks are printed"


_SIGNAL_IN_A_FINALIZER = textwrap.dedent(
    """
    import sys, time, weakref
    from tf_medseg.training.interrupts import Interrupts

    def busy(*_):
        print("in the finalizer", flush=True)
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            pass

    class Slow:
        # A __del__ as TensorFlow's checkpoint objects have (recognised by the handler), or a
        # weakref callback (not recognised: its exception reaches sys.unraisablehook).
        if sys.argv[1] == "__del__":
            __del__ = busy

    with Interrupts(grace_s=0) as interrupts:
        try:
            print("ready", flush=True)
            input()
            obj = Slow()
            if sys.argv[1] == "callback":
                ref = weakref.ref(obj, busy)
            del obj
            for _ in range(200):
                time.sleep(0.01)
            print("not raised", flush=True)
        except KeyboardInterrupt:
            print("raised after the finalizer", flush=True)
        time.sleep(0.5)  # the watchdog reads the pipe
        print("signals counted:", interrupts._count, flush=True)
    """
)


@pytest.mark.parametrize("finalizer", ["__del__", "callback"])
def test_a_signal_in_a_finalizer_is_raised_after_it_without_a_traceback(finalizer):
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGNAL_IN_A_FINALIZER, finalizer],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "in the finalizer"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "raised after the finalizer" in stdout, stdout
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert "signals counted: 1" in stdout, "raising it again is not a second signal"


_CONSOLE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, signal, sys
    from importlib.metadata import entry_points

    seen = {}

    class Spy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name in ("absl", "numpy") and name not in seen:
                seen[name] = signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            return None

    sys.meta_path.insert(0, Spy())
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "tf-medseg-train"]
    sys.argv = ["tf-medseg-train", "--helpshort"]
    try:
        script.load()()
    except SystemExit:
        pass
    print(sorted(seen.items()))
    """
)


def test_the_console_script_handles_signals_before_its_heavy_imports(tmp_path):
    """``tf-medseg-train`` (the installed console script) has its SIGINT/SIGTERM handlers before
    absl and NumPy are imported: a signal during those imports (a third of a second on a loaded
    machine) ends it with one line, not a traceback or death by SIGTERM."""
    # Run outside the repository: an egg-info folder there (a build's) would be read before the
    # installed package's metadata.
    result = subprocess.run(
        [sys.executable, "-c", _CONSOLE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[('absl', True), ('numpy', True)]"

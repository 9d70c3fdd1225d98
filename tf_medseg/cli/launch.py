"""Start N local workers of a command under tf.distribute: ``tf-medseg-launch``.

Example (two workers on one machine, one GPU each where there are GPUs)::

    tf-medseg-launch --num_workers=2 -- tf-medseg-train --preset=msd_spleen \\
        --data_dir=/data/Task09_Spleen --workdir=runs/spleen --distribution=tf

Each worker gets a ``TF_CONFIG`` naming all workers on free localhost ports and its own index
(with ``--distribution=auto``, the default, the training CLI then picks tf.distribute), and
``TF_MEDSEG_LOCAL_RANK`` (its GPU on this node). Output lines are prefixed with ``[rank]``.
SIGINT and SIGTERM are forwarded to every worker (each saves a checkpoint and stops, as a
single run does). When a worker fails, the others are stopped (SIGTERM, then SIGKILL after
``--grace_s``) and the launcher exits with that worker's status, naming it: a dead worker never
leaves the others waiting in a collective. For several machines, set ``TF_CONFIG`` per worker
yourself or run under SLURM (``--distribution=tf`` reads the job's nodes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from tf_medseg.planning.system import LOCAL_RANK_VARIABLE  # no TensorFlow in the launcher


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that are free on localhost now (bound, read, released)."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("localhost", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def worker_environments(num_workers: int, base: dict[str, str] | None = None) -> list[dict]:
    """One environment per worker: ``TF_CONFIG`` (all workers, its index) and its local rank."""
    base = dict(os.environ if base is None else base)
    hosts = [f"localhost:{port}" for port in free_ports(num_workers)]
    envs = []
    for index in range(num_workers):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        envs.append({**base, "TF_CONFIG": json.dumps(tf_config), LOCAL_RANK_VARIABLE: str(index)})
    return envs


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Launcher:
    """The workers of one launch; :meth:`run` waits for them and returns the exit status."""

    def __init__(self, command: Sequence[str], num_workers: int, grace_s: float = 10.0):
        self.command = list(command)
        self.grace_s = grace_s
        self.procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        for rank, env in enumerate(worker_environments(num_workers)):
            env.setdefault("PYTHONUNBUFFERED", "1")
            proc = subprocess.Popen(
                self.command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only
            )
            self.procs.append(proc)
            thread = threading.Thread(target=self._relay, args=(rank, proc), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _relay(self, rank: int, proc: subprocess.Popen) -> None:
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace")
            with self._lock:
                sys.stdout.write(f"[{rank}] {line}")
                sys.stdout.flush()

    def signal_all(self, signum: int) -> None:
        """Sends a signal to every worker that still runs (and to its children)."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def _stop_others(self) -> None:
        self.signal_all(signal.SIGTERM)
        deadline = time.time() + self.grace_s
        while time.time() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        self.signal_all(signal.SIGKILL)

    def run(self) -> int:
        """Waits for the workers; returns 0, or the first failed worker's status (1 for a
        signal), after stopping the others."""
        failed = None
        while True:
            codes = [p.poll() for p in self.procs]
            for rank, code in enumerate(codes):
                if code not in (None, 0) and failed is None:
                    failed = (rank, code)
            if failed is not None:
                rank, code = failed
                if any(c is None for c in codes):
                    self._log(f"worker {rank} failed ({_describe(code)}); stopping the others")
                    self._stop_others()
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.1)
        for proc in self.procs:
            proc.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        if failed is None:
            return 0
        rank, code = failed
        self._log(f"worker {rank} failed: {_describe(code)}")
        return code if code > 0 else 1

    def _log(self, message: str) -> None:
        with self._lock:
            print(f"tf-medseg-launch: {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tf-medseg-launch",
        description=__doc__.split("\n\n")[0],
        epilog="Everything after -- is the worker command.",
    )
    parser.add_argument("--num_workers", type=int, required=True, help="Workers to start.")
    parser.add_argument(
        "--grace_s",
        type=float,
        default=10.0,
        help="Seconds the other workers get to stop after one fails, before SIGKILL.",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the worker command.")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command: tf-medseg-launch --num_workers=N -- COMMAND ...")
    if args.num_workers < 1:
        parser.error(f"--num_workers must be at least 1, got {args.num_workers}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    launcher = Launcher(args.command, args.num_workers, args.grace_s)

    def forward(signum, frame):
        del frame
        launcher._log(f"forwarding {signal.Signals(signum).name} to the workers")
        launcher.signal_all(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    return launcher.run()


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()

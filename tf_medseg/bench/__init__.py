"""Benchmarks: each prints a table and writes JSON (``make bench``); never part of the tests."""

import platform

from tf_medseg import jsonio


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` where there is one, else the machine type."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """What a benchmark's JSON records of where it ran: the command, the commit (with ``+``
    when the tree had changes), the CPU model and its vector extensions, the cores, the date."""
    import os
    import subprocess
    import sys
    import time

    from tf_medseg.planning.system import cpu_flags

    def git(*args):
        proc = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or None
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "command": " ".join(["python", *sys.orig_argv[1:]]),
        "commit": commit,
        "cpu": cpu_name(),
        "cpu_flags": [f for f in wanted if f in cpu_flags()],
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_json(path: str, value) -> None:
    """Writes a benchmark's results as JSON (creating the folder) and says where."""
    jsonio.write_json(path, value)
    print(f"wrote {path}")


def run_training(command: list[str], workdir: str, name: str) -> tuple[dict, list[dict]]:
    """Runs a ``tf-medseg-train`` command, its output in ``workdir/train.log``; returns the
    run's ``summary.json`` and its ``metrics.jsonl`` records.

    Raises:
        RuntimeError: The run failed; the message names it and its log.
    """
    import json
    import os
    import subprocess

    from tf_medseg import rundir

    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "train.log"), "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {workdir}/train.log")
    run = rundir.RunDir(workdir)
    with open(run.metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return run.read_json(rundir.SUMMARY), records

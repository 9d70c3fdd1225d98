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

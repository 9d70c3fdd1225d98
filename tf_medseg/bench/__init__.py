"""Benchmarks: each prints a table and writes JSON (``make bench``); never part of the tests."""

import json
import os
import platform


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as file:
        json.dump(value, file, indent=2)
    print(f"wrote {path}")

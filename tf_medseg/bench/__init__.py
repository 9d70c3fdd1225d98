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

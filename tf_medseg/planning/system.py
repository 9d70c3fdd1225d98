"""What the machine has: usable cores, CPU instruction sets, RAM, and GPUs (TensorFlow's view).

Everything but :func:`gpus` reads the OS only (no TensorFlow import), so the planner and the
CLIs can describe a CPU machine in milliseconds.
"""

from __future__ import annotations

import os
import sys


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, which containers and job schedulers
    narrow), not the machine's total."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (``avx2``, ``avx512_bf16``, ``amx_bf16``...); empty
    where ``/proc/cpuinfo`` is not available."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_native(flags: set[str] | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX); elsewhere TensorFlow
    emulates it, many times slower than float32."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes (Linux reports kilobytes, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def ram_bytes() -> tuple[int, int]:
    """(total, available) RAM in bytes, from ``/proc/meminfo`` (0, 0 where it is missing)."""
    values = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0))


def _nvidia_smi_memory_gb() -> list[float]:
    """Each GPU's total memory from ``nvidia-smi`` (empty where it is not installed)."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        return [float(line) / 1024 for line in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def gpus() -> list[dict]:
    """The GPUs TensorFlow sees: ``{"name", "compute_capability", "memory_gb"}`` each; the
    memory from ``nvidia-smi`` (TensorFlow reports none before it allocates), None without it.
    Imports TensorFlow."""
    import tensorflow as tf

    memory = _nvidia_smi_memory_gb()
    found = []
    for i, device in enumerate(tf.config.list_physical_devices("GPU")):
        details = tf.config.experimental.get_device_details(device)
        found.append(
            {
                "name": details.get("device_name", device.name),
                "compute_capability": details.get("compute_capability"),
                "memory_gb": memory[i] if i < len(memory) else None,
            }
        )
    return found


# Set by tf-medseg-launch for each worker it starts: the worker's index on this node, which
# selects its GPU (tf_medseg.distributed reads it; neither side needs TensorFlow to agree on it).
LOCAL_RANK_VARIABLE = "TF_MEDSEG_LOCAL_RANK"


def describe_machine(target: str = "auto", gpu_memory_gb: float | None = None) -> dict:
    """The machine the plan is for. ``target``: ``auto`` (a GPU if TensorFlow sees one), ``cpu``
    or ``gpu`` (planning for a GPU node from elsewhere needs ``gpu_memory_gb``)."""
    total, available = ram_bytes()
    flags = cpu_flags()
    machine = {
        "kind": "cpu",
        "cpu_cores": cpu_count(),
        "cpu_bf16_native": cpu_bf16_native(flags),
        "cpu_avx512": "avx512f" in flags,
        "ram_gb": round(total / 2**30, 1),
        "ram_available_gb": round(available / 2**30, 1),
        "gpus": [],
    }
    if target in ("auto", "gpu"):
        found = gpus() if target == "auto" or gpu_memory_gb is None else []
        if found:
            machine["gpus"] = found
        elif target == "gpu":
            machine["gpus"] = [{"name": "GPU", "compute_capability": None, "memory_gb": None}]
    if machine["gpus"]:
        machine["kind"] = "gpu"
        if gpu_memory_gb:
            for gpu in machine["gpus"]:
                gpu["memory_gb"] = float(gpu_memory_gb)
    return machine

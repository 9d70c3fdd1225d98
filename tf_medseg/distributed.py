"""Horovod wrapper that degrades to a single process.

Under ``horovodrun -np N`` (Horovod sets ``HOROVOD_RANK`` and friends in each worker's
environment) :func:`setup` initialises Horovod, pins one GPU per local rank where GPUs exist,
and returns a :class:`Distributed` that averages gradients with ``hvd.DistributedGradientTape``,
broadcasts the initial variables from rank 0 and all-reduces validation sums. Started without
``horovodrun``, or with Horovod not installed, it is inert: rank 0 of 1, and every method is the
identity.

``hvd.DistributedOptimizer`` is deliberately not used: with a separate ``tape.gradient`` and
``apply_gradients`` it does not average the gradients, and the replicas' weights drift apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

_LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launched_by_horovod() -> bool:
    """Whether this process was started by ``horovodrun`` (or mpirun) as one of several ranks."""
    return any(v in os.environ for v in _LAUNCHER_VARIABLES)


@dataclass
class Distributed:
    """This process's place among the workers, and the collective operations.

    Attributes:
        rank: This worker's index.
        size: Number of workers.
        local_rank: Index on this node (selects the GPU).
        hvd: The ``horovod.tensorflow`` module, or None in a single process.
        fp16_allreduce: Compress gradient all-reduce to float16.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    hvd: Any = None
    fp16_allreduce: bool = False

    @property
    def is_chief(self) -> bool:
        """Rank 0 writes checkpoints, TensorBoard and metrics."""
        return self.rank == 0

    def gradient_tape(self, tape: tf.GradientTape) -> tf.GradientTape:
        """Wraps a tape so that its gradients are averaged over the workers."""
        if self.hvd is None:
            return tape
        compression = (
            self.hvd.Compression.fp16 if self.fp16_allreduce else self.hvd.Compression.none
        )
        return self.hvd.DistributedGradientTape(tape, compression=compression)

    def broadcast_variables(self, variables: list[tf.Variable]) -> None:
        """Copies rank 0's values into every worker's variables."""
        if self.hvd is not None and variables:
            self.hvd.broadcast_variables(variables, root_rank=0)

    def allreduce_sum(self, values: np.ndarray, name: str) -> np.ndarray:
        """Sum of ``values`` over the workers (float64 in, float64 out)."""
        if self.hvd is None:
            return np.asarray(values, np.float64)
        total = self.hvd.allreduce(
            tf.constant(np.asarray(values, np.float64)), op=self.hvd.Sum, name=name
        )
        return total.numpy()

    def allreduce_mean(self, value: float, name: str) -> float:
        """Mean of a scalar over the workers."""
        return float(self.allreduce_sum(np.array([value]), name)[0] / self.size)

    def barrier(self) -> None:
        """Waits for every worker."""
        if self.hvd is not None:
            self.hvd.allreduce(tf.constant(0.0), name="barrier")


def setup(fp16_allreduce: bool = False) -> Distributed:
    """Initialises Horovod when launched by ``horovodrun``; otherwise returns a single process.

    Args:
        fp16_allreduce: Compress gradient all-reduce to float16.

    Returns:
        The process's :class:`Distributed`.

    Raises:
        RuntimeError: Launched by horovodrun, but Horovod is not installed.
    """
    if not launched_by_horovod():
        return Distributed(fp16_allreduce=fp16_allreduce)
    try:
        import horovod.tensorflow as hvd
    except ImportError as err:
        raise RuntimeError(
            "started by horovodrun but horovod.tensorflow cannot be imported: install Horovod "
            "with TensorFlow support (make venv builds it)"
        ) from err
    hvd.init()
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
    return Distributed(
        rank=hvd.rank(),
        size=hvd.size(),
        local_rank=hvd.local_rank(),
        hvd=hvd,
        fp16_allreduce=fp16_allreduce,
    )

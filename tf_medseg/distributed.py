"""Horovod wrapper that degrades to a single process (the paper's multi-GPU, multi-node training).

Under ``horovodrun -np N`` (Horovod sets ``HOROVOD_RANK`` and friends in each worker's
environment) :func:`setup` initialises Horovod, pins one GPU per local rank where GPUs exist,
and returns a :class:`Distributed` that averages gradients with ``hvd.DistributedGradientTape``,
broadcasts the initial variables from rank 0, all-reduces validation sums and makes every
decision that ends a loop collective. Started without ``horovodrun``, or with Horovod not
installed, it is inert: rank 0 of 1, and every method is the identity.

Rules the training loop follows so that N workers never wait for each other forever:

* every collective is called by every rank in the same order (a rank that skips one, or calls
  one the others do not, makes the others wait in it);
* a decision to leave a loop is taken either from quantities identical on every rank (the step
  counter, the all-reduced validation result, the all-reduced loss) or through :meth:`any_rank`
  (the wall-clock bound, which each rank measures on its own clock);
* the epoch length must be equal on every rank (:meth:`check_same` turns a mismatch into an
  error at start-up instead of a hang at the first epoch end).

``hvd.DistributedOptimizer`` is deliberately not used: with a separate ``tape.gradient`` and
``apply_gradients`` it does not average the gradients, and the replicas' weights drift apart.

Learning rate: with ``--scale_lr`` the peak rate is multiplied by the number of workers (the
global batch grows by the same factor; Goyal et al. 2017, "linear scaling rule"). Large rates
are unstable in the first steps, so pair it with a linear warm-up (``--warmup_steps``, about five
epochs' worth of steps); :meth:`Distributed.scaled_learning_rate` warns when there is none.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

_LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


class WorkerMismatchError(RuntimeError):
    """A quantity that must be equal on every worker differs between them."""


def launched_by_horovod() -> bool:
    """Whether this process was started by ``horovodrun`` (or mpirun) as one of several ranks."""
    return any(v in os.environ for v in _LAUNCHER_VARIABLES)


@dataclass
class Distributed:
    """This process's place among the workers, and the collective operations.

    Every method that communicates must be called by all workers, in the same order.

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
        """Wraps a tape so that its gradients are averaged over the workers.

        The all-reduce runs in float32 (the variables' dtype, also under mixed precision), or in
        float16 on the wire with ``fp16_allreduce`` (``hvd.Compression.fp16``).
        """
        if self.hvd is None:
            return tape
        compression = (
            self.hvd.Compression.fp16 if self.fp16_allreduce else self.hvd.Compression.none
        )
        return self.hvd.DistributedGradientTape(tape, compression=compression)

    def mean_in_graph(self, value: tf.Tensor, name: str) -> tf.Tensor:
        """Mean of a tensor over the workers, as a TF op (usable inside ``tf.function``)."""
        if self.hvd is None:
            return value
        return self.hvd.allreduce(value, op=self.hvd.Average, name=name)

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

    def any_rank(self, flag: bool, name: str) -> bool:
        """True on every worker if ``flag`` is true on at least one (a collective decision).

        Use it for a stop condition that each worker evaluates on its own, such as a wall-clock
        bound: otherwise one worker leaves the loop and the others wait for it in the next
        gradient all-reduce.
        """
        return bool(self.allreduce_sum(np.array([1.0 if flag else 0.0]), name)[0] > 0)

    def allgather_object(self, value: Any, name: str) -> list:
        """Every worker's ``value`` (picklable), in rank order, on every worker."""
        if self.hvd is None:
            return [value]
        return list(self.hvd.allgather_object(value, name=name))

    def broadcast_object(self, value: Any, name: str) -> Any:
        """Rank 0's ``value`` (picklable) on every worker; the others' ``value`` is ignored."""
        if self.hvd is None:
            return value
        return self.hvd.broadcast_object(value, root_rank=0, name=name)

    def check_same(self, value: Any, what: str) -> None:
        """Raises on every worker if ``value`` is not the same on all of them.

        Args:
            value: A picklable value that must agree (e.g. steps per epoch, the restored step).
            what: What the value is, for the message.

        Raises:
            WorkerMismatchError: The workers hold different values (listed per rank).
        """
        values = self.allgather_object(value, name="check_same_" + re.sub(r"\W", "_", what))
        if any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise WorkerMismatchError(f"{what} differs between the workers ({per_rank})")

    def scaled_learning_rate(self, learning_rate: float, scale: bool, warmup_steps: int) -> float:
        """The peak learning rate, times the number of workers when ``scale`` is set.

        Args:
            learning_rate: The single-worker peak rate.
            scale: Apply the linear scaling rule.
            warmup_steps: The run's linear warm-up steps (only checked, for the warning).

        Returns:
            The rate the optimiser should reach after warm-up.
        """
        if not scale or self.size == 1:
            return learning_rate
        if warmup_steps == 0 and self.is_chief:
            logging.warning(
                "--scale_lr multiplies the learning rate by %d without warm-up; large rates are "
                "unstable in the first steps: set --warmup_steps to about five epochs of steps",
                self.size,
            )
        return learning_rate * self.size

    def barrier(self) -> None:
        """Waits for every worker."""
        if self.hvd is not None:
            self.hvd.allreduce(tf.constant(0.0), name="barrier")


def _pin_gpu(local_rank: int) -> None:
    """Makes one GPU visible to this worker (memory growth on), chosen by its local rank."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return
    gpu = gpus[local_rank % len(gpus)]
    if local_rank >= len(gpus):
        logging.warning(
            "local rank %d shares %s: more workers than GPUs on this node", local_rank, gpu.name
        )
    # Visible devices can be set only before TensorFlow initialises them (a second Trainer in
    # the same process finds them already set).
    if tf.config.get_visible_devices("GPU") != [gpu]:
        tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.set_visible_devices(gpu, "GPU")


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
    _pin_gpu(hvd.local_rank())
    return Distributed(
        rank=hvd.rank(),
        size=hvd.size(),
        local_rank=hvd.local_rank(),
        hvd=hvd,
        fp16_allreduce=fp16_allreduce,
    )

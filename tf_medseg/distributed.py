"""Multi-worker training behind one interface: Horovod, tf.distribute, or a single process.

One process per device (GPU, or a CPU worker), each with its own input pipeline and cache shard,
gradients averaged over the workers every step: the paper's data-parallel training. Two
backends give the collectives (``--distribution``):

* ``horovod`` (the paper's, in the paper profile): under ``horovodrun -np N`` (Horovod sets
  ``HOROVOD_RANK`` and friends in each worker's environment) :func:`setup` initialises
  Horovod, pins one GPU per local rank where GPUs exist, and averages gradients with
  ``hvd.DistributedGradientTape`` (NCCL on GPUs, Gloo on CPUs).
* ``tf`` (both profiles; the only one in the modern profile, which has no Horovod):
  ``tf.distribute.MultiWorkerMirroredStrategy`` reads the cluster from ``TF_CONFIG`` (set per
  worker by ``tf-medseg-launch`` or a cluster manager) or from SLURM, and its collectives
  (NCCL on GPUs, gRPC ring all-reduce on CPUs) run inside ``strategy.run``. The model and the
  optimiser stay ordinary variables, kept equal on every worker as under Horovod (rank 0's
  initial values broadcast, the same averaged gradients applied), so checkpoints, validation,
  cache shards and the rules below are the same for both backends.

``auto``: Horovod under ``horovodrun``, tf.distribute when ``TF_CONFIG`` is set, else one
process, which is inert (rank 0 of 1, every method the identity).

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
For the same reason the tf backend averages in :meth:`Distributed.gradient_tape`, not in the
optimiser (a Keras optimiser under a strategy sums, and only for mirrored variables).

Learning rate: with ``--scale_lr`` the peak rate is multiplied by the number of workers (the
global batch grows by the same factor; Goyal et al. 2017, "linear scaling rule"). Large rates
are unstable in the first steps, so pair it with a linear warm-up (``--warmup_steps``, about five
epochs' worth of steps); :meth:`Distributed.scaled_learning_rate` warns when there is none.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from tf_medseg.choices import BACKENDS
from tf_medseg.planning.system import LOCAL_RANK_VARIABLE

_LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


class WorkerMismatchError(RuntimeError):
    """A quantity that must be equal on every worker differs between them."""


class DistributionError(RuntimeError):
    """The chosen multi-worker backend cannot start here; the message says what to do."""


def launched_by_horovod() -> bool:
    """Whether this process was started by ``horovodrun`` (or mpirun) as one of several ranks."""
    return any(v in os.environ for v in _LAUNCHER_VARIABLES)


def choose_backend(requested: str = "auto") -> str:
    """The backend ``--distribution=requested`` means in this process's environment.

    Raises:
        ValueError: An unknown name.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown distribution {requested!r}; choose from {BACKENDS}")
    if requested != "auto":
        return requested
    if launched_by_horovod():
        return "horovod"
    return "tf" if os.environ.get("TF_CONFIG") else "none"


class _AveragingTape:
    """A gradient tape whose ``gradient`` returns the mean over the workers (the tf backend)."""

    def __init__(self, tape: tf.GradientTape, dist: Distributed):
        self._tape = tape
        self._dist = dist

    def gradient(self, target, sources, **kwargs):
        grads = self._tape.gradient(target, sources, **kwargs)
        present = [g for g in grads if g is not None]
        if self._dist.fp16_allreduce:
            wire = [tf.cast(g, tf.float16) if g.dtype == tf.float32 else g for g in present]
        else:
            wire = present
        averaged = iter(self._dist._tf_all_reduce(wire, "MEAN"))
        return [None if g is None else tf.cast(next(averaged), g.dtype) for g in grads]


@dataclass
class Distributed:
    """This process's place among the workers, and the collective operations.

    Every method that communicates must be called by all workers, in the same order.

    Attributes:
        rank: This worker's index.
        size: Number of workers.
        local_rank: Index on this node (selects the GPU).
        hvd: The ``horovod.tensorflow`` module under the Horovod backend, else None.
        fp16_allreduce: Compress gradient all-reduce to float16.
        strategy: The ``MultiWorkerMirroredStrategy`` under the tf backend, else None.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    hvd: Any = None
    fp16_allreduce: bool = False
    strategy: Any = None
    _tf_functions: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def backend(self) -> str:
        """``horovod``, ``tf`` or ``none``."""
        return "horovod" if self.hvd is not None else "tf" if self.strategy is not None else "none"

    def _tf_all_reduce(self, values: list, op: str) -> list:
        """All-reduce (``SUM`` or ``MEAN``) of tensors through the strategy, in one collective.

        Inside a ``tf.function`` (the train step) the collective joins that graph; called
        eagerly it runs as a small ``tf.function`` of its own (traced once per shape), because
        the strategy's eager collectives are slow.
        """
        if not values:
            return []
        if tf.inside_function():
            return self._tf_all_reduce_graph(list(values), op)
        if op not in self._tf_functions:
            self._tf_functions[op] = tf.function(
                lambda tensors: self._tf_all_reduce_graph(tensors, op), reduce_retracing=True
            )
        return self._tf_functions[op](list(values))

    def _tf_all_reduce_graph(self, values: list, op: str) -> list:
        reduce_op = getattr(tf.distribute.ReduceOp, op)
        # The collective needs placed inputs (a function's tensors have no device of their own).
        with tf.device(self.strategy.extended.worker_devices[0]):
            values = [tf.identity(v) for v in values]

        def replica_fn(*tensors):
            # One collective per dtype: the strategy packs a list into one buffer.
            context = tf.distribute.get_replica_context()
            out = list(tensors)
            for dtype in {t.dtype for t in tensors}:
                where = [i for i, t in enumerate(tensors) if t.dtype == dtype]
                reduced = context.all_reduce(reduce_op, [tensors[i] for i in where])
                for i, value in zip(where, reduced, strict=True):
                    out[i] = value
            return out

        result = self.strategy.run(replica_fn, args=tuple(values))
        return [self.strategy.experimental_local_results(r)[0] for r in result]

    @property
    def is_chief(self) -> bool:
        """Rank 0 writes checkpoints, TensorBoard and metrics."""
        return self.rank == 0

    def gradient_tape(self, tape: tf.GradientTape) -> tf.GradientTape:
        """Wraps a tape so that its gradients are averaged over the workers.

        The all-reduce runs in float32 (the variables' dtype, also under mixed precision), or in
        float16 on the wire with ``fp16_allreduce`` (``hvd.Compression.fp16``).
        """
        if self.strategy is not None:
            return _AveragingTape(tape, self)
        if self.hvd is None:
            return tape
        compression = (
            self.hvd.Compression.fp16 if self.fp16_allreduce else self.hvd.Compression.none
        )
        return self.hvd.DistributedGradientTape(tape, compression=compression)

    def mean_in_graph(self, value: tf.Tensor, name: str) -> tf.Tensor:
        """Mean of a tensor over the workers, as a TF op (usable inside ``tf.function``)."""
        if self.strategy is not None:
            return self._tf_all_reduce([value], "MEAN")[0]
        if self.hvd is None:
            return value
        return self.hvd.allreduce(value, op=self.hvd.Average, name=name)

    def broadcast_variables(self, variables: list[tf.Variable]) -> None:
        """Copies rank 0's values into every worker's variables."""
        if self.strategy is not None and variables:
            # A sum in which only rank 0 contributes (one collective for all the variables).
            mine = [
                v.read_value() if self.rank == 0 else tf.zeros_like(v.read_value())
                for v in variables
            ]
            for variable, value in zip(variables, self._tf_all_reduce(mine, "SUM"), strict=True):
                variable.assign(value)
        elif self.hvd is not None and variables:
            self.hvd.broadcast_variables(variables, root_rank=0)

    def allreduce_sum(self, values: np.ndarray, name: str) -> np.ndarray:
        """Sum of ``values`` over the workers (float64 in, float64 out)."""
        if self.strategy is not None:
            total = self._tf_all_reduce([tf.constant(np.asarray(values, np.float64))], "SUM")[0]
            return total.numpy()
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
        if self.strategy is not None:
            return self._tf_gather_objects(value, everyone=True)
        if self.hvd is None:
            return [value]
        return list(self.hvd.allgather_object(value, name=name))

    def broadcast_object(self, value: Any, name: str) -> Any:
        """Rank 0's ``value`` (picklable) on every worker; the others' ``value`` is ignored."""
        if self.strategy is not None:
            return self._tf_gather_objects(value, everyone=False)[0]
        if self.hvd is None:
            return value
        return self.hvd.broadcast_object(value, root_rank=0, name=name)

    def _tf_gather_objects(self, value: Any, everyone: bool) -> list:
        """Pickled objects through two integer all-reduces: first the lengths, then a
        ``size x longest`` matrix in which each worker fills its own row (only rank 0 unless
        ``everyone``)."""
        contributes = everyone or self.rank == 0
        data = (
            np.frombuffer(pickle.dumps(value), np.uint8) if contributes else np.zeros(0, np.uint8)
        )
        lengths = np.zeros(self.size, np.float64)
        lengths[self.rank] = data.size
        lengths = self.allreduce_sum(lengths, "object_lengths").astype(np.int64)
        # Widths rounded up to a power of two: few shapes, so few traces of the reduction.
        width = 1 << max(6, int(lengths.max() - 1).bit_length())
        rows = np.zeros((self.size, width), np.int32)
        rows[self.rank, : data.size] = data
        rows = self._tf_all_reduce([tf.constant(rows)], "SUM")[0].numpy()
        return [
            pickle.loads(rows[r, : lengths[r]].astype(np.uint8).tobytes()) if lengths[r] else None
            for r in range(self.size)
        ]

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


def setup(fp16_allreduce: bool = False, distribution: str = "auto") -> Distributed:
    """This process's place among the workers, with the backend initialised.

    Must run before TensorFlow executes its first operation (the tf backend configures the
    collective runtime, which cannot change once TensorFlow has started).

    Args:
        fp16_allreduce: Compress gradient all-reduce to float16.
        distribution: ``auto``, ``horovod``, ``tf`` or ``none`` (:func:`choose_backend`).

    Returns:
        The process's :class:`Distributed`.

    Raises:
        RuntimeError: The chosen backend cannot start here (not installed, no cluster).
    """
    backend = choose_backend(distribution)
    if backend == "horovod":
        return _setup_horovod(fp16_allreduce)
    if backend == "tf":
        return _setup_tf(fp16_allreduce)
    return Distributed(fp16_allreduce=fp16_allreduce)


def _setup_horovod(fp16_allreduce: bool) -> Distributed:
    if not launched_by_horovod():
        raise DistributionError(
            "--distribution=horovod needs workers started by horovodrun (e.g. horovodrun -np 2 "
            "tf-medseg-train ...); for one process use --distribution=none"
        )
    try:
        import horovod.tensorflow as hvd
    except ImportError as err:
        raise DistributionError(
            "started by horovodrun but horovod.tensorflow cannot be imported: install Horovod "
            "with TensorFlow support (make venv builds it; the modern profile has no Horovod: "
            "use tf-medseg-launch and --distribution=tf)"
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


def _cluster_resolver():
    """The cluster: from ``TF_CONFIG`` (None: the strategy's default reads it) or SLURM."""
    if os.environ.get("TF_CONFIG"):
        return None
    if "SLURM_JOB_ID" in os.environ:
        return tf.distribute.cluster_resolver.SlurmClusterResolver()
    raise DistributionError(
        "--distribution=tf needs the cluster in TF_CONFIG (tf-medseg-launch --num_workers=N -- "
        "tf-medseg-train ... sets it on one machine) or a SLURM job"
    )


def _tf_rank(resolver) -> int:
    """The worker's index among all tasks (a ``chief`` task, if any, is rank 0)."""
    spec = resolver.cluster_spec().as_dict()
    offset = 1 if resolver.task_type == "worker" and "chief" in spec else 0
    return int(resolver.task_id or 0) + offset


def _setup_tf(fp16_allreduce: bool) -> Distributed:
    from tf_medseg import stack

    if stack.profile() == "paper":
        # Measured: under TensorFlow 2.15 two workers' losses left the one-process curve from
        # the second step on (weights equal on both workers), while under 2.21 they follow it
        # to 1e-6 (tests/test_distributed.py). Refuse rather than train differently.
        raise DistributionError(
            f"--distribution=tf needs TensorFlow 2.16 or newer (the modern profile; this is "
            f"{stack.tensorflow_version()}): under TensorFlow 2.15 use horovodrun"
        )
    resolver = _cluster_resolver()
    local_rank = int(os.environ.get(LOCAL_RANK_VARIABLE, os.environ.get("SLURM_LOCALID", "0")))
    if resolver is None:  # TF_CONFIG: one device per worker, like Horovod
        _pin_gpu(local_rank)
    gpus = tf.config.list_physical_devices("GPU")
    implementation = (
        tf.distribute.experimental.CommunicationImplementation.NCCL
        if gpus
        else tf.distribute.experimental.CommunicationImplementation.RING
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver,
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=implementation
        ),
    )
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict()
    workers = sum(len(tasks) for kind, tasks in spec.items() if kind in ("chief", "worker"))
    if strategy.num_replicas_in_sync != workers:
        raise DistributionError(
            f"tf_medseg runs one device per worker, but the strategy has "
            f"{strategy.num_replicas_in_sync} replicas for {workers} workers: start one worker "
            "per GPU (tf-medseg-launch does)"
        )
    return Distributed(
        rank=_tf_rank(resolver),
        size=workers,
        local_rank=local_rank,
        fp16_allreduce=fp16_allreduce,
        strategy=strategy,
    )

"""Writing a checkpoint and the best model so that a failure leaves the last good ones.

TensorFlow writes a checkpoint's files under temporary names and names it in the ``checkpoint``
index file (replaced atomically) only once they are complete: after a failed save the index
still names the previous checkpoint, which the next run resumes from. The failed save's files
are removed here, so that they hold no space. The best model is written complete and on disk
under a temporary name, then renamed over the previous one. A failure is one
:class:`~tf_medseg.training.records.WorkdirError` naming the file, the system's reason and what
is left.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil

import tensorflow as tf

from tf_medseg.training.records import WorkdirError


def save_checkpoint(manager: tf.train.CheckpointManager, step: int) -> None:
    """Saves ``manager``'s checkpoint numbered ``step``.

    Raises:
        WorkdirError: The checkpoint could not be written (a full disk, a quota, a read-only
            folder); the message names it, the reason, and the checkpoint left.
    """
    try:
        manager.save(checkpoint_number=step)
    except (tf.errors.OpError, OSError) as err:
        prefix = os.path.join(manager.directory, f"ckpt-{step}")
        # What the next run resumes from is what the index file on disk names.
        saved = tf.train.get_checkpoint_state(manager.directory)
        last = saved.model_checkpoint_path if saved else None
        for temporary in glob.glob(f"{glob.escape(prefix)}_temp*"):  # the shards' folder
            shutil.rmtree(temporary, ignore_errors=True)
        if last is None or os.path.basename(last) != os.path.basename(prefix):
            for leftover in glob.glob(f"{glob.escape(prefix)}.*"):
                with contextlib.suppress(OSError):
                    os.remove(leftover)
        after = (
            f"the last checkpoint, {last}, is intact: free space and run the same command "
            "to resume from it"
            if last
            else "there is no earlier checkpoint: free space and run the same command"
        )
        raise WorkdirError(
            f"cannot write the checkpoint {prefix}: {write_failure(err)}; {after}"
        ) from err


def export_model(model: tf.keras.Model, path: str) -> None:
    """Writes ``model`` to ``path`` (a ``.keras`` file) atomically.

    Raises:
        WorkdirError: The model could not be written; the previous file is kept.
    """
    tmp = os.path.join(os.path.dirname(path), "best_model.tmp.keras")
    try:
        model.save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise WorkdirError(
            f"cannot write {path}: {write_failure(err)} (the previous best model and the "
            "last checkpoint are intact: free space, or make the folder writable, and run "
            "the same command to resume)"
        ) from err


def write_failure(err: BaseException) -> str:
    """The system's reason for a failed write (``No space left on device``), from an OSError or
    from TensorFlow's error, whose message ends ``<file>; <reason> [Op:SaveV2]``."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = getattr(err, "message", None) or str(err)
    text = re.sub(r"^\{\{.*?\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:\w+\]\s*$", "", text)
    return text.rsplit("; ", 1)[-1].strip() or type(err).__name__

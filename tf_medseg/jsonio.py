"""The one way tf_medseg writes its JSON files: atomically, NumPy scalars and arrays as numbers.

A reader (TensorBoard scripts, a second worker, a resumed run, a user's ``cat``) never sees a
half-written file: the text goes to a temporary file in the same folder, which then replaces
the target in one ``os.replace``. No TensorFlow here, so the CLIs can use it before importing it.
"""

from __future__ import annotations

import json
import os
import secrets

import numpy as np


def _jsonable(value):
    if isinstance(value, np.integer | np.floating | np.bool_):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


def dumps(value, indent: int | None = 2, sort_keys: bool = False) -> str:
    """JSON text of ``value`` (NumPy scalars and arrays as numbers and lists)."""
    return json.dumps(value, indent=indent, sort_keys=sort_keys, default=_jsonable)


def write_text(path: str, text: str) -> str:
    """Writes ``text`` to ``path`` atomically (creating the folder); returns the path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # mkstemp's name, but the user's umask for the mode (mkstemp's 0600 would hide the run's
    # files from the others who read them).
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the old file (a crash keeps one)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str, value, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Writes ``value`` as JSON to ``path`` atomically (creating the folder); returns the path."""
    return write_text(path, dumps(value, indent=indent, sort_keys=sort_keys) + "\n")

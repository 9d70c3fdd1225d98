"""The experiment presets (flagfiles) shipped with the package, and flagfile expansion.

A preset is a flagfile in this folder, selected by name with ``--preset=NAME``
(``tf-medseg-train --preset=msd_spleen ...``). A user's own flagfile still works with
``--flagfile=PATH``. Both are expanded here, before absl parses the command line, so that a
nested ``--flagfile=`` line is opened relative to the file that contains it (absl opens it
relative to the current folder, which breaks every preset that includes another one as soon as
the command runs outside the repository, and in the Docker image). A relative path that does
not exist beside its file but does from the current folder is taken from there, as absl would.

Expansion is in place: a flag after ``--preset``/``--flagfile`` overrides what the file set,
and a flag before it is overridden by the file, exactly as with absl's own ``--flagfile``.
"""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_MAX_DEPTH = 16


class PresetError(ValueError):
    """An unknown preset, a missing flagfile, or flagfiles that include each other."""


def names() -> list[str]:
    """The shipped presets' names (``msd_spleen``, ``synthetic_spleen``, ...), sorted."""
    return sorted(f[: -len(".flags")] for f in os.listdir(_HERE) if f.endswith(".flags"))


def path(name: str) -> str:
    """The flagfile of a shipped preset."""
    if name.endswith(".flags"):
        name = name[: -len(".flags")]
    file = os.path.join(_HERE, f"{name}.flags")
    if not os.path.isfile(file):
        raise PresetError(f"unknown preset {name!r}; the presets are: {', '.join(names())}")
    return file


def _value(arg: str, flag: str) -> str | None:
    prefix = f"--{flag}="
    return arg[len(prefix) :] if arg.startswith(prefix) else None


def _lines(file: str) -> list[str]:
    try:
        with open(file) as f:
            text = f.read()
    except OSError as err:
        raise PresetError(f"cannot read flagfile {file}: {err.strerror or err}") from err
    return [line.strip() for line in text.splitlines() if line.strip() and line.lstrip()[0] != "#"]


def _resolve(file: str, containing_dir: str | None) -> str:
    file = os.path.expanduser(file)
    if os.path.isabs(file) or containing_dir is None:
        return os.path.abspath(file)
    beside = os.path.join(containing_dir, file)
    if os.path.isfile(beside) or not os.path.isfile(file):
        return os.path.abspath(beside)
    return os.path.abspath(file)  # absl's reading: relative to the current folder


def _joined(args: list[str]) -> list[str]:
    """``--preset NAME`` and ``--flagfile PATH`` (absl's two-argument form) as one argument;
    the arguments after ``--`` are not flags and stay as they are."""
    out, i = [], 0
    while i < len(args):
        if args[i] == "--":
            return out + args[i:]
        if args[i] in ("--preset", "--flagfile") and i + 1 < len(args):
            out.append(f"{args[i]}={args[i + 1]}")
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def _expand(args: list[str], containing_dir: str | None, stack: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    args = _joined(args)
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        preset, flagfile = _value(arg, "preset"), _value(arg, "flagfile")
        if preset is None and flagfile is None:
            out.append(arg)
            continue
        if preset is not None:
            file = path(preset)
            out.append(f"--preset={os.path.basename(file)[: -len('.flags')]}")
        else:
            file = _resolve(flagfile, containing_dir)
        if file in stack or len(stack) >= _MAX_DEPTH:
            chain = " -> ".join([*stack, file])
            raise PresetError(f"flagfiles include each other: {chain}")
        out += _expand(_lines(file), os.path.dirname(file), (*stack, file))
    return out


def expand_flagfiles(argv: list[str]) -> list[str]:
    """``argv`` with every ``--preset=NAME`` and ``--flagfile=PATH`` replaced in place by the
    file's flags (recursively; nested relative paths resolved beside their file). The
    ``--preset`` argument itself is kept, so the chosen preset's name reaches its flag.

    Raises:
        PresetError: An unknown preset, an unreadable file, or a cycle of flagfiles.
    """
    if not argv:
        return list(argv)
    return [argv[0], *_expand(list(argv[1:]), None, ())]

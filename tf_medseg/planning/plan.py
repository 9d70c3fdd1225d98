"""The plan as data: planned settings with a reason each, as a run folder keeps them.

A :class:`Plan` holds typed values of :class:`~tf_medseg.config.TrainConfig` fields (``2.0``,
``32``, ``True``, ``(5.0, 95.0)``), which :func:`~tf_medseg.config.resolve_config` takes as the
plan's layer directly (defaults < plan < preset < command line). The rules that make it are in
:mod:`tf_medseg.planning.rules`; this module writes it (``plan.json``, a flagfile, a table),
reads it back, and keeps a resumed run on the plan it started with (:func:`resumed_plan`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tf_medseg.config import TrainConfig, field_value

#: The planned settings a resumed run plans again (:func:`resumed_plan`): they fit the run to the
#: machine it runs on (RAM, windows per forward pass) without changing what it learns. The
#: others (network, patch, spacing, precision, loss, ...) are the run's, kept from its plan.
REPLANNED = ("memory_budget_gb", "val_sw_batch_size")

_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def setting_text(value: Any) -> str:
    """A planned value as written on the command line (``2``, ``5,95``, ``true``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(setting_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Planned settings and their reasons.

    Attributes:
        settings: ``TrainConfig`` field -> typed value (an isotropic size may be one number).
        reasons: Field -> why (also for settings that follow from the others).
        estimated_memory_gb: The training step's estimated peak memory.
        machine: :func:`tf_medseg.planning.system.describe_machine`'s description.
        fingerprint: :func:`tf_medseg.planning.fingerprint.fingerprint` of the data.
    """

    settings: dict[str, Any]
    reasons: dict[str, str]
    estimated_memory_gb: float
    machine: dict
    fingerprint: dict

    def __post_init__(self):
        unknown = sorted(set(self.settings) - _FIELDS)
        if unknown:
            raise ValueError(f"planned settings that are not TrainConfig fields: {unknown}")

    def to_json(self) -> dict:
        """``plan.json``: the settings at the top level (tuples as lists), then the rest."""
        fp = {k: v for k, v in self.fingerprint.items() if k != "cases"}
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings.items()}
        return {
            **settings,
            "estimated_memory_gb": round(self.estimated_memory_gb, 3),
            "reasons": self.reasons,
            "machine": self.machine,
            "fingerprint": fp,
        }

    def flagfile(self) -> str:
        lines = [f"# tf-medseg-plan for {self.fingerprint['task']} on this {self.machine['kind']}"]
        lines += [f"--{k}={setting_text(v)}" for k, v in self.settings.items()]
        return "\n".join(lines) + "\n"

    def table(self) -> str:
        texts = {k: setting_text(v) for k, v in self.settings.items()}
        width = max(len(k) for k in texts)
        vwidth = max(len(v) for v in texts.values())
        rows = [f"{'setting'.ljust(width)}  {'value'.ljust(vwidth)}  reason"]
        rows += [
            f"{k.ljust(width)}  {v.ljust(vwidth)}  {self.reasons.get(k, '')}"
            for k, v in texts.items()
        ]
        rows.append(f"estimated memory of a training step: {self.estimated_memory_gb:.2f} GB")
        return "\n".join(rows)


def saved_settings(saved: Any) -> dict[str, Any]:
    """The typed settings of a ``plan.json`` (:meth:`Plan.to_json`; one written before the plan
    was typed keeps its values under ``"flags"`` as text); empty for anything else."""
    if not isinstance(saved, dict):
        return {}
    texts = saved.get("flags")
    values = texts if isinstance(texts, dict) else saved
    try:
        return {k: field_value(k, v) for k, v in values.items() if k in _FIELDS}
    except (TypeError, ValueError):
        return {}


def resumed_plan(fresh: Plan, saved: dict, source: str) -> tuple[Plan, list[str]]:
    """The plan of a resumed run: the settings of the plan it started with, but those in
    :data:`REPLANNED`, which take ``fresh``'s values (this machine's).

    A run planned without a preset and resumed on another machine (or after the data's
    fingerprint or the rules changed) would otherwise get another network or precision than its
    checkpoints, or train on with other settings than its results so far.

    Args:
        fresh: The plan for this machine (:func:`tf_medseg.planning.rules.plan_for`).
        saved: The run's ``plan.json``.
        source: Where ``saved`` was read from, for the lines.

    Returns:
        The plan, and one line per re-planned value that changed.
    """
    old = saved_settings(saved)
    if not old:  # not a plan.json of ours: nothing to keep
        return fresh, []
    settings, reasons = dict(old), dict(saved.get("reasons", {}))
    lines = []
    for name in REPLANNED:
        if name not in fresh.settings:
            continue
        settings[name], reasons[name] = fresh.settings[name], fresh.reasons.get(name, "")
        if name not in old or old[name] != field_value(name, settings[name]):
            was = setting_text(old[name]) if name in old else "(not planned)"
            lines.append(
                f"--{name}={was} -> {setting_text(settings[name])}: re-planned for this machine "
                f"({reasons[name]}); the other planned flags are {source}'s"
            )
    memory = float(saved.get("estimated_memory_gb", fresh.estimated_memory_gb))
    return Plan(settings, reasons, memory, fresh.machine, fresh.fingerprint), lines


def write_plan(plan: Plan, json_path: str | None = None, flags_path: str | None = None) -> None:
    """Writes the plan as JSON and/or as a flagfile (atomically)."""
    from tf_medseg.jsonio import write_json, write_text

    if json_path:
        write_json(json_path, plan.to_json())
    if flags_path:
        write_text(flags_path, plan.flagfile())

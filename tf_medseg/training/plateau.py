"""When the validation Dice has stopped rising: the plateau stop and the plateau decay.

Pure: no TensorFlow, no threads, no clock. :func:`advance` takes the rule, the state after the
previous validation and the new validation's mean Dice, and returns the new state and what to
do: lower the learning rate, stop the run, or neither. The trainer keeps the state in its
checkpointed counters, so a resumed run goes on counting where it stopped.

A validation is a *gain* when its Dice exceeds the Dice of the last gain by more than
``min_delta`` (Keras' ``EarlyStopping``): small rises on a noisy plateau do not restart the
count, and the reference does not creep upwards with them. ``stale`` counts validations since
the last gain; the run stops when it reaches ``patience``. With a decay, the learning rate is
multiplied by ``decay_factor`` after every ``decay_patience`` validations without a gain (the
count restarts after each decay, as Keras' ``ReduceLROnPlateau``), down to ``min_scale``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PlateauRule:
    """Attributes:
    patience: Validations without a gain before the run stops (0: never).
    min_delta: The Dice rise that counts as a gain.
    decay_patience: Validations without a gain before each decay (0: no decay).
    decay_factor: What each decay multiplies the learning rate by, in (0, 1).
    min_scale: The lowest multiple of the peak learning rate a decay goes to.
    """

    patience: int = 0
    min_delta: float = 0.001
    decay_patience: int = 0
    decay_factor: float = 0.5
    min_scale: float = 1e-3

    def errors(self) -> list[str]:
        """Out-of-range values, one line each, in the training flags' names."""
        errors = []
        if self.patience < 0:
            errors.append(f"--patience must be >= 0, got {self.patience}")
        if not 0.0 <= self.min_delta <= 1.0:
            errors.append(f"--min_delta must be in [0, 1], got {self.min_delta}")
        if self.decay_patience < 0:
            errors.append(f"--lr_decay_patience must be >= 0, got {self.decay_patience}")
        if not 0.0 < self.decay_factor < 1.0:
            errors.append(f"--lr_decay_factor must be in (0, 1), got {self.decay_factor}")
        return errors


@dataclasses.dataclass(frozen=True)
class PlateauState:
    """Attributes:
    reference: The mean Dice of the last gain (-1 before the first validation).
    stale: Validations since the last gain.
    since_decay: Validations since the last gain or the last decay, whichever is later.
    scale: The learning rate's multiple of its schedule (1 until a decay).
    """

    reference: float = -1.0
    stale: int = 0
    since_decay: int = 0
    scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class PlateauStep:
    """The state after a validation, and what it asks for."""

    state: PlateauState
    decayed: bool
    stop: bool


def advance(rule: PlateauRule, state: PlateauState, dice: float) -> PlateauStep:
    """The state after a validation of mean Dice ``dice`` (NaN: not a gain).

    Returns:
        The new state; ``decayed`` when the learning rate is to be lowered now (the new scale
        is ``state.scale``); ``stop`` when ``rule.patience`` validations have passed without a
        gain.
    """
    if dice == dice and (state.reference < 0 or dice > state.reference + rule.min_delta):
        return PlateauStep(PlateauState(float(dice), 0, 0, state.scale), False, False)
    stale, since_decay, scale = state.stale + 1, state.since_decay + 1, state.scale
    decayed = False
    if rule.decay_patience and since_decay >= rule.decay_patience and scale > rule.min_scale:
        scale = max(rule.min_scale, scale * rule.decay_factor)
        since_decay, decayed = 0, True
    stop = bool(rule.patience) and stale >= rule.patience
    return PlateauStep(PlateauState(state.reference, stale, since_decay, scale), decayed, stop)


def stop_line(rule: PlateauRule, state: PlateauState, best_dice: float, best_step: int) -> str:
    """Why the run stopped, in one line."""
    return (
        f"plateau: no validation Dice above {state.reference:.4f} + --min_delta "
        f"{rule.min_delta:g} in the last {state.stale} validations (--patience={rule.patience}; "
        f"best {best_dice:.4f} at step {best_step})"
    )

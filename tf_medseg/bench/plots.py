"""Plots of the benchmarks: validation Dice against wall time, per configuration and per class."""

from __future__ import annotations


def plot_curves(results: dict, path: str, title: str) -> None:
    """Validation Dice against wall time, one line per configuration (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        if r["curve"]:
            wall, dice, _ = zip(*r["curve"], strict=True)
            ax.plot(
                wall, [d if d is not None else float("nan") for d in dice], marker=".", label=name
            )
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("validation mean Dice")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_class_curves(results: dict, path: str, title: str) -> bool:
    """Validation Dice of each class against wall time, one panel per class and one line per
    configuration; written only for tasks of more than one foreground class (returns whether)."""
    classes = list(dict.fromkeys(c for r in results.values() for c in r.get("class_curves", {})))
    if len(classes) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(classes), figsize=(5 * len(classes), 4), squeeze=False)
    for ax, cls in zip(axes[0], classes, strict=True):
        for name, r in results.items():
            points = r.get("class_curves", {}).get(cls)
            if points:
                wall, dice, _ = zip(*points, strict=True)
                dice = [d if d is not None else float("nan") for d in dice]
                ax.plot(wall, dice, marker=".", label=name)
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel(f"validation Dice, {cls}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

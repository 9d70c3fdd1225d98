"""The README's measured tables, rendered from the committed benchmark JSON (``docs/bench/``),
so that a table and its data cannot disagree.

In ``README.md`` a rendered table sits between ``<!-- rendered: NAME -->`` and
``<!-- /rendered -->``; ``NAME`` is a key of :data:`RENDERERS`, whose function turns
``docs/bench/NAME.json`` into the Markdown between the markers, closed by a line that says where
the figures come from (the command, commit, CPU and date the JSON records)::

    python -m tf_medseg.bench.render            # rewrites the README's rendered tables
    python -m tf_medseg.bench.render --check    # exit 1 naming each table that differs

The tests run the check, so a JSON changed without its table (or the other way round) fails.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from collections.abc import Callable

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCK = re.compile(r"(<!-- rendered: (\w+) -->\n)(.*?)(<!-- /rendered -->)", re.S)


def _spread(values: list[float], digits: int) -> str:
    """The median, and the range when the values differ."""
    if not values:
        return "-"
    mid = round(statistics.median(values), digits)
    mid = int(mid) if digits == 0 else mid
    low, high = min(values), max(values)
    return f"{mid}" if low == high else f"{mid} ({low}-{high})"


def _source(data: dict, json_name: str) -> str:
    commit = (data.get("commit") or "not recorded")[:12]
    command = data.get("command") or "; ".join(data.get("commands") or ["command not recorded"])
    extensions = ", ".join(data.get("cpu_flags") or []) or "extensions not recorded"
    return (
        f"Data: `docs/bench/{json_name}.json` (`{command}`; "
        f"commit {commit}; {data.get('cpu', '?')} ({extensions}), {data.get('cpu_count', '?')} "
        f"cores; {data.get('date', '?')})."
    )


#: Names of the plateau-stop benchmark's configurations in its table.
PLATEAU_ROWS = {
    "constant": "plateau stop, constant rate (the plan)",
    "decay": "plateau stop, rate halved on the plateau",
    "reference": "no stop, constant rate, {minutes:g} minutes (seed {seeds} only)",
}


def plateau_stop(data: dict) -> list[str]:
    """``bench.plateau_stop``: per task and configuration, medians (ranges) over the seeds."""
    runs, minutes = data["runs"], data["reference_minutes"]
    lines = [
        "| task | configuration | runs | stopped at (s) | best validation Dice (training grid) "
        "| saved (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    for task in tasks:
        for config, label in PLATEAU_ROWS.items():
            group = [r for r in runs if (r["task"], r["config"]) == (task, config)]
            if not group:
                continue
            wall = [round(r["wall_s"]) for r in group]
            dice = [round(r["best_dice"], 4) for r in group]
            seeds = ",".join(str(r["seed"]) for r in group)
            saved = "-"
            if config != "reference":
                saved = _spread([round(60 * minutes - w) for w in wall], 0)
            name = label.format(minutes=minutes, seeds=seeds)
            lines.append(
                f"| {task} | {name} | {len(group)} | {_spread(wall, 0)} | {_spread(dice, 4)} "
                f"| {saved} |"
            )
    return lines


def predict_stages(data: dict) -> list[str]:
    """``bench.predict_stages``: seconds per volume by stage, and the window stage against the
    bare forward pass."""
    volumes = data["volumes"]
    stages = list(dict.fromkeys(s for v in volumes for s in v["stages_s"]))
    lines = [
        "| volume (source -> grid) | windows | "
        + " | ".join(f"{s} (s)" for s in stages)
        + " | total (s) | bare forward (s) | windows / forward |",
        "| --- | --- | " + " | ".join("---" for _ in stages) + " | --- | --- | --- |",
    ]
    for v in volumes:
        shapes = f"{'x'.join(map(str, v['source_shape']))} -> {'x'.join(map(str, v['grid_shape']))}"
        cells = " | ".join(f"{v['stages_s'].get(s, 0.0):.2f}" for s in stages)
        lines.append(
            f"| {shapes} | {v['windows']} | {cells} | {v['total_s']:.2f} | "
            f"{v['bare_forward_s']:.2f} | {v['windows_over_forward']:.2f}x |"
        )
    return lines


def postprocessing_liver(data: dict) -> list[str]:
    """The post-processing choice: per class, Dice as predicted and with its largest component."""
    decision = data["decision"]
    kept = set(decision["keep_largest"])
    lines = [
        "| class | mean validation Dice as predicted | with its largest component only | kept |",
        "| --- | --- | --- | --- |",
    ]
    for index, (without, with_) in enumerate(
        zip(decision["dice_without"], decision["dice_with"], strict=True), start=1
    ):
        name = data["classes"][str(index)]
        keep = "yes" if index in kept else "no"
        lines.append(f"| {name} | {without:.4f} | {with_:.4f} | {keep} |")
    return lines


#: The time-split parts the time-to-Dice table shows on their own (the rest is summed).
_NAMED_PARTS = ("training", "validation", "native_validation")


def time_to_dice(data: dict) -> list[str]:
    """``bench.time_to_dice``: per configuration, over its seeds, the time to the target (a run
    that missed it counts with its cap), the best Dice in the labels' geometry, where each run's
    time went (``time_split``, medians) and the share validation took."""
    on = "in the labels' geometry" if data.get("target_on") == "native" else "on the training grid"
    lines = [
        f"| configuration | runs | reached Dice {data['target_dice']:g} ({on}) | time to it (s), "
        "median (range) | best Dice, labels' geometry | run's seconds: training / validation / "
        "scoring in the labels' geometry / other | validation share (%) | patches/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    cap = 60 * data["max_minutes_per_run"]
    for name, block in data["runs"].items():
        runs = list(block["per_seed"].values())
        times = [round(r["time_to_target_s"]) for r in runs]
        native = [
            round(r["native"]["mean_dice"], 4)
            for r in runs
            if r.get("native") and r["native"].get("mean_dice") is not None
        ]
        splits = [r["time_split"] for r in runs if r.get("time_split")]

        def part(value, splits=splits):  # the median over the runs of value(split)
            values = [value(split) for split in splits]
            return f"{statistics.median(values):.0f}" if values else "-"

        seconds = " / ".join(
            [part(lambda split, k=k: split.get(k, 0.0)) for k in _NAMED_PARTS]
            + [
                part(
                    lambda split: sum(split.values()) - sum(split.get(k, 0.0) for k in _NAMED_PARTS)
                )
            ]
        )
        shares = [
            round(100 * r["validation_fraction"]) for r in runs if r.get("validation_fraction")
        ]
        rate = [round(r["patches_per_s"], 2) for r in runs]
        lines.append(
            f"| {name} | {len(runs)} | {sum(r['reached_target'] for r in runs)} of {len(runs)} | "
            f"{_spread(times, 0)}{'' if block['reached_target'] else f'; {cap:g} is the cap'} | "
            f"{_spread(native, 4)} | {seconds} | {_spread(shares, 0)} | "
            f"{_spread(rate, 2)} |"
        )
    if not data.get("complete", True):
        lines += [
            "",
            "The benchmark was stopped before all its runs: the rows hold the runs it ended.",
        ]
    if "speedup" in data:
        capped = " (the baseline capped: at least)" if data.get("baseline_capped") else ""
        lines += [
            "",
            f"Speed-up of the medians, baseline over proposed: {data['speedup']:.2f}x{capped}.",
        ]
    return lines


#: README table name -> its renderer (of ``docs/bench/<name>.json``).
RENDERERS: dict[str, Callable[[dict], list[str]]] = {
    "plateau_stop": plateau_stop,
    "predict_stages": predict_stages,
    "predict_stages_1mm": predict_stages,
    "time_to_dice_spleen_msd": time_to_dice,
    "postprocessing_liver": postprocessing_liver,
}


def render(name: str, bench_dir: str) -> str:
    """The block of table ``name`` (between its markers), from ``bench_dir/<name>.json``."""
    with open(os.path.join(bench_dir, f"{name}.json")) as f:
        data = json.load(f)
    return "\n".join([*RENDERERS[name](data), "", _source(data, name)]) + "\n"


def rendered_readme(text: str, bench_dir: str) -> tuple[str, list[str]]:
    """``text`` with every rendered block rewritten; and the names of the blocks that changed.

    Raises:
        ValueError: A block names no renderer.
    """
    changed = []

    def block(match: re.Match) -> str:
        name = match.group(2)
        if name not in RENDERERS:
            raise ValueError(
                f"README block 'rendered: {name}' has no renderer ({sorted(RENDERERS)})"
            )
        body = render(name, bench_dir)
        if body != match.group(3):
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(block, text), changed


def main(argv: list[str]) -> int:
    del argv
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    new, changed = rendered_readme(text, os.path.join(ROOT, "docs", "bench"))
    if flags.FLAGS.check:
        for name in changed:
            print(
                f"README.md: the table '{name}' differs from docs/bench/{name}.json",
                file=sys.stderr,
            )
        return 1 if changed else 0
    if changed:
        with open(readme, "w") as f:
            f.write(new)
    print(f"README.md: {len(changed)} table(s) rewritten {changed if changed else ''}".rstrip())
    return 0


if __name__ == "__main__":
    flags.DEFINE_bool("check", False, "Only check: exit 1 naming each table that differs.")
    app.run(main)

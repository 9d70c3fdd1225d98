"""What a training step spends its time on: a summary of a ``tf.profiler`` trace.

Record a trace with the trainer's ``--profile_steps=START,END`` (it lands in
``WORKDIR/tensorboard/plugins/profile/<run>/*.xplane.pb``), then::

    python -m tf_medseg.bench.step_profile --trace=WORKDIR [--top=15] [--json=PATH]

It reads the newest trace under ``--trace`` (a folder or an ``.xplane.pb`` file), computes every
event's self time (its duration minus the events nested in it on the same thread), and prints
the self time per TensorFlow op type, split into the threads that run the training step's and
validation's ops (``tf_Compute``), the input pipeline's threads (``tf_data_*``) and the Python
threads (whose time includes waiting for the step). Profile steps without a validation in
between (a large ``--val_every``) to see the training step alone. Events that are not ops
(executor bookkeeping, memory allocation, eager dispatch) are summed as ``(framework)``. The
profiler is TensorFlow's own; this module only reads its XSpace protobuf (TensorBoard's profile
plugin is not needed).
"""

from __future__ import annotations

import collections
import glob
import os

from absl import app, flags

from tf_medseg.bench import write_json


def newest_trace(path: str) -> str:
    """The newest ``*.xplane.pb`` under ``path`` (or ``path`` itself)."""
    if os.path.isfile(path):
        return path
    found = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no *.xplane.pb under {path} (train with --profile_steps)")
    return max(found, key=os.path.getmtime)


def _group(line_name: str) -> str:
    if line_name.startswith("tf_data"):
        return "input pipeline threads"
    if line_name.startswith("tf_Compute"):
        return "compute threads (train step, validation)"
    return "python threads (eager dispatch; includes waiting for the step)"


def summarise(path: str) -> dict:
    """Self time (ms) per op type and per thread group of one trace.

    Returns:
        ``{"trace": path, "span_ms": ..., "groups": {group: {"total_ms": ...,
        "op_types": {type: ms}, "ops": {name: ms}}}}`` with ops sorted by time.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with open(path, "rb") as f:
        space = xplane_pb2.XSpace.FromString(f.read())
    host = next(plane for plane in space.planes if plane.name == "/host:CPU")
    names = {key: meta.name for key, meta in host.event_metadata.items()}
    groups: dict[str, dict] = collections.defaultdict(
        lambda: {"total_ms": 0.0, "op_types": collections.Counter(), "ops": collections.Counter()}
    )
    first, last = None, None
    for line in host.lines:
        events = sorted(line.events, key=lambda e: (e.offset_ps, -e.duration_ps))
        self_ps = [e.duration_ps for e in events]
        stack: list[tuple[int, int]] = []  # (end, index) of the enclosing events
        for i, event in enumerate(events):
            while stack and stack[-1][0] <= event.offset_ps:
                stack.pop()
            if stack:
                self_ps[stack[-1][1]] -= event.duration_ps
            stack.append((event.offset_ps + event.duration_ps, i))
        start_ns = line.timestamp_ns
        for event, own in zip(events, self_ps, strict=True):
            begin = start_ns + event.offset_ps / 1000
            first = begin if first is None else min(first, begin)
            end = begin + event.duration_ps / 1000
            last = end if last is None else max(last, end)
            name = names.get(event.metadata_id, "?")
            ms = max(own, 0) / 1e9
            group = groups[_group(line.name)]
            group["total_ms"] += ms
            if ":" in name and "::" not in name:
                op_name, op_type = name.rsplit(":", 1)
                group["op_types"][op_type] += ms
                group["ops"][op_name] += ms
            else:
                group["op_types"]["(framework)"] += ms
    return {
        "trace": path,
        "span_ms": ((last or 0) - (first or 0)) / 1e6,
        "groups": {
            name: {
                "total_ms": g["total_ms"],
                "op_types": dict(g["op_types"].most_common()),
                "ops": dict(g["ops"].most_common(50)),
            }
            for name, g in sorted(groups.items())
        },
    }


def format_summary(summary: dict, top: int = 15) -> str:
    """The summary as text: per group, the op types with the most self time."""
    lines = [f"trace {summary['trace']}", f"traced span {summary['span_ms'] / 1e3:.2f} s"]
    for name, group in summary["groups"].items():
        total = group["total_ms"]
        lines.append(f"\n{name}: {total / 1e3:.2f} s of thread time")
        lines.append(f"  {'op type':<32} {'self ms':>10} {'share':>7}")
        for op_type, ms in list(group["op_types"].items())[:top]:
            lines.append(f"  {op_type:<32} {ms:10.1f} {ms / max(total, 1e-9):7.1%}")
        lines.append(f"  {'op':<60} {'self ms':>10}")
        for op, ms in list(group["ops"].items())[: max(5, top // 2)]:
            lines.append(f"  {op[-60:]:<60} {ms:10.1f}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    args = flags.FLAGS
    summary = summarise(newest_trace(args.trace))
    print(format_summary(summary, args.top))
    if args.json:
        write_json(args.json, summary)


if __name__ == "__main__":
    flags.DEFINE_string("trace", None, "A training workdir, a folder or an .xplane.pb.")
    flags.DEFINE_integer("top", 15, "Op types listed per group.")
    flags.DEFINE_string("json", None, "Also write the summary here.")
    flags.mark_flag_as_required("trace")
    app.run(main)

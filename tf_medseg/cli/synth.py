"""``tf-medseg-synth``: writes a synthetic MSD-layout task (spleen, heart or liver).

Examples::

    # Small phantoms, 96 voxels in-plane (+-10%).
    tf-medseg-synth --task=spleen --out=data/synthetic_spleen --num_train=16 --num_test=2 \
        --size=96 --seed=0
    # Each case's shape and spacing drawn from the real MSD task's ranges (512 x 512 x 31-168).
    tf-medseg-synth --task=spleen --geometry=msd --out=data/synthetic_spleen_msd --num_train=32
"""

from __future__ import annotations

from absl import app, flags

from tf_medseg.data.synthetic import GEOMETRIES, TASKS, generate_task

FLAGS = flags.FLAGS
flags.DEFINE_enum("task", "spleen", list(TASKS), "Which synthetic task to write.")
flags.DEFINE_string("out", None, "Task folder to write.", required=True)
flags.DEFINE_integer("num_train", 16, "Labelled training cases.", lower_bound=1)
flags.DEFINE_integer("num_test", 2, "Test cases (labels go to labelsTs/).", lower_bound=0)
flags.DEFINE_enum(
    "geometry",
    "size",
    list(GEOMETRIES),
    "Each case's shape and spacing. size: --size voxels in-plane (+-10%). msd: drawn from the "
    "real MSD task's ranges (spleen and liver 512 x 512 voxels in-plane, heart 320 x 320).",
)
flags.DEFINE_integer(
    "size", 96, "In-plane size in voxels (+-10% per case); --geometry=size only.", lower_bound=8
)
flags.DEFINE_integer("seed", 0, "Seed; the same flags write the same bytes.")
flags.DEFINE_integer("num_modalities", 1, "Channels of the heart task's images.", lower_bound=1)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.geometry != "size" and FLAGS["size"].present:
        raise app.UsageError("--size applies to --geometry=size only")
    out = generate_task(
        FLAGS.task,
        FLAGS.out,
        num_train=FLAGS.num_train,
        num_test=FLAGS.num_test,
        size=FLAGS.size,
        seed=FLAGS.seed,
        num_modalities=FLAGS.num_modalities,
        progress=True,
        geometry=FLAGS.geometry,
    )
    print(f"wrote synthetic {FLAGS.task} task to {out}")


def run() -> None:
    """Console entry point."""
    app.run(main)


if __name__ == "__main__":
    run()

"""``tf-medseg-download``: fetches a Medical Segmentation Decathlon task into a folder.

Examples::

    tf-medseg-download --task=Task09_Spleen --out=data
    # Another mirror, or a tar downloaded elsewhere (for a machine without network):
    tf-medseg-download --task=Task09_Spleen --out=data --url=/mnt/Task09_Spleen.tar \\
        --md5=410d4a301da4e5b2f6f86ec3ddba524e

The download resumes where an interrupted one stopped (run the same command again), is checked
against the task's MD5 before anything is unpacked, is unpacked atomically (``OUT/TASK`` appears
complete or not at all) without the macOS ``._*`` files, and the result is read with the
package's MSD reader. See :mod:`tf_medseg.data.download`.
"""

from __future__ import annotations

import sys

from absl import app, flags

from tf_medseg.data.download import MSD_TASKS, DownloadError, fetch_task

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "task", None, "The task's folder name: " + ", ".join(MSD_TASKS) + ".", required=True
)
flags.DEFINE_string("out", None, "The folder to put the task folder in.", required=True)
flags.DEFINE_string(
    "url",
    None,
    "Another location of the task's tar: an http(s):// or file:// URL, or a local path "
    "(default: the task's public location, which MONAI downloads from too).",
)
flags.DEFINE_string(
    "md5",
    None,
    "The tar's MD5 (default: the public tar's; with --url and no --md5 nothing is verified, "
    "and a line says so).",
)
flags.DEFINE_bool("keep_archive", False, "Keep the downloaded tar after unpacking.")
flags.DEFINE_bool("progress", True, "Show a progress bar while downloading.")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.url and not FLAGS.md5:
        print(f"tf-medseg-download: no --md5 for {FLAGS.url}: the archive is not verified")
    try:
        done = fetch_task(
            FLAGS.task,
            FLAGS.out,
            url=FLAGS.url,
            md5=FLAGS.md5,
            progress=FLAGS.progress,
            keep_archive=FLAGS.keep_archive,
        )
    except DownloadError as err:
        print(f"tf-medseg-download: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "tf-medseg-download: interrupted; what was downloaded is kept, run the same command "
            "again to resume",
            file=sys.stderr,
        )
        return 130
    if done.already_there:
        print(f"{done.folder} is already there and reads as a task; nothing to do")
        return 0
    parts = [f"{done.folder} is ready"]
    if done.downloaded_bytes:
        parts.append(f"{done.downloaded_bytes / 2**20:.1f} MB downloaded")
    if done.resumed_from:
        parts.append(f"resumed after {done.resumed_from / 2**20:.1f} MB")
    parts.append("MD5 verified" if done.verified else "not verified")
    if done.dropped:
        parts.append(f"{done.dropped} macOS ._* files dropped")
    print("; ".join(parts))
    return 0


def run() -> None:
    """Console entry point."""
    app.run(main)


if __name__ == "__main__":
    run()

"""Fetching a Medical Segmentation Decathlon task: download, verify, unpack, check.

The ten MSD tasks are published as one tar each, at the locations MONAI's ``DecathlonDataset``
downloads from, with the MD5 sums MONAI checks (:data:`MSD_TASKS`). :func:`fetch_task` does what
a user would do by hand, in an order where no step can leave a half-done result that looks done:

1. **Download** to ``OUT/TASK.tar.part``, resuming a previous partial download with an HTTP
   ``Range`` request (a server that ignores it sends the whole file again, which is then started
   over), with a progress bar. A local file or ``file://`` URL is read in place.
2. **Verify** the whole file's MD5 before anything is unpacked; a mismatch removes the
   download (it cannot be resumed into a good one) and says so.
3. **Unpack** into a hidden folder beside the destination, dropping the macOS ``._*``
   AppleDouble files the archives contain and refusing members that would land outside it;
   only once complete is it renamed to ``OUT/TASK`` (one ``rename``: atomic on one filesystem).
4. **Check** the result with the package's own reader (:func:`tf_medseg.data.msd.load_task`).

Every failure is a :class:`DownloadError` with one line saying what and where.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from tqdm import tqdm

_HOST = "https://msd-for-monai.s3-us-west-2.amazonaws.com"

#: Task name -> (download location, MD5 of the tar), as MONAI's ``DecathlonDataset`` has them.
MSD_TASKS: dict[str, tuple[str, str]] = {
    "Task01_BrainTumour": (f"{_HOST}/Task01_BrainTumour.tar", "240a19d752f0d9e9101544901065d872"),
    "Task02_Heart": (f"{_HOST}/Task02_Heart.tar", "06ee59366e1e5124267b774dbd654057"),
    "Task03_Liver": (f"{_HOST}/Task03_Liver.tar", "a90ec6c4aa7f6a3d087205e23d4e6397"),
    "Task04_Hippocampus": (f"{_HOST}/Task04_Hippocampus.tar", "9d24dba78a72977dbd1d2e110310f31b"),
    "Task05_Prostate": (f"{_HOST}/Task05_Prostate.tar", "35138f08b1efaef89d7424d2bcc928db"),
    "Task06_Lung": (f"{_HOST}/Task06_Lung.tar", "8afd997733c7fc0432f71255ba4e52dc"),
    "Task07_Pancreas": (f"{_HOST}/Task07_Pancreas.tar", "4f7080cfca169fa8066d17ce6eb061e4"),
    "Task08_HepaticVessel": (
        f"{_HOST}/Task08_HepaticVessel.tar",
        "641d79e80ec66453921d997fbf12a29c",
    ),
    "Task09_Spleen": (f"{_HOST}/Task09_Spleen.tar", "410d4a301da4e5b2f6f86ec3ddba524e"),
    "Task10_Colon": (f"{_HOST}/Task10_Colon.tar", "bad7a188931dc2f6acf72b08eb6202d0"),
}

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A task could not be fetched, verified, unpacked or read (one line: what and where)."""


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch_task` did.

    Attributes:
        folder: The task folder (``OUT/TASK``).
        downloaded_bytes: Bytes transferred by this call (0 for a local file or a task already
            there).
        resumed_from: Bytes of a previous partial download that this call continued (0: none).
        verified: Whether an MD5 sum was checked.
        dropped: Archive members left out (macOS ``._*`` files).
        already_there: The task folder existed and read as a task; nothing was done.
    """

    folder: str
    downloaded_bytes: int = 0
    resumed_from: int = 0
    verified: bool = False
    dropped: int = 0
    already_there: bool = False


def fetch_task(
    task: str,
    out: str,
    url: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    keep_archive: bool = False,
    timeout_s: float = 60.0,
) -> Fetched:
    """Downloads, verifies, unpacks and checks one MSD task into ``out/task``.

    Args:
        task: The task's folder name, e.g. ``Task09_Spleen`` (one of :data:`MSD_TASKS` unless
            ``url`` is given).
        out: The folder to put the task folder in (created if missing).
        url: Another location (an ``http(s)://`` or ``file://`` URL, or a local path) instead
            of the task's public one.
        md5: The archive's MD5 (default: the public one's, when ``url`` is not given).
        progress: Show a progress bar while downloading.
        keep_archive: Keep the downloaded tar after unpacking (it is removed by default).
        timeout_s: Seconds without data before a download is given up.

    Returns:
        What was done.

    Raises:
        DownloadError: On an unknown task, no network, a failed transfer, a checksum mismatch,
            an unreadable archive or an archive that does not hold the task.
    """
    if url is None:
        if task not in MSD_TASKS:
            raise DownloadError(
                f"unknown task {task!r}: choose one of {', '.join(MSD_TASKS)}, or give --url"
            )
        url, public_md5 = MSD_TASKS[task]
        md5 = md5 or public_md5
    folder = os.path.join(out, task)
    if os.path.isdir(folder):
        _check_task(folder, "is there but")
        return Fetched(folder, already_there=True)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create {out}: {err.strerror}") from err
    local = _local_path(url)
    if local is not None:
        archive, got, resumed = local, 0, 0
        if md5:
            _verify(archive, md5, remove=False)
    else:
        archive = os.path.join(out, f"{task}.tar")
        got, resumed = _download(url, archive + ".part", progress, timeout_s)
        if md5:
            _verify(archive + ".part", md5, remove=True)
        os.replace(archive + ".part", archive)
    dropped = _unpack(archive, task, out)
    if local is None and not keep_archive:
        os.remove(archive)
    return Fetched(folder, got, resumed, bool(md5), dropped)


def _local_path(url: str) -> str | None:
    """The file a ``file://`` URL or a plain path names; None for a network URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return None
    path = urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else url
    if not os.path.isfile(path):
        raise DownloadError(f"{url}: no such file (give an http(s):// URL or a local tar)")
    return path


def _download(url: str, part: str, progress: bool, timeout_s: float) -> tuple[int, int]:
    """Downloads ``url`` into ``part``, continuing what it holds; returns (bytes transferred,
    bytes continued from)."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the partial file is already whole
            return 0, have
        raise DownloadError(f"{url}: the server answered {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"cannot reach {url} ({reason}): no network here? Download the tar elsewhere and "
            "give it with --url=PATH (and --md5)"
        ) from err
    with response:
        resumed = have if response.status == 206 else 0
        length = response.headers.get("Content-Length")
        total = resumed + int(length) if length is not None else None
        return _copy(response, part, resumed, total, progress, url), resumed


def _copy(response, part: str, resumed: int, total: int | None, progress: bool, url: str) -> int:
    """Appends the response's body to ``part`` (or writes it afresh when not resumed)."""
    got = 0
    bar = tqdm(
        total=total,
        initial=resumed,
        unit="B",
        unit_scale=True,
        desc=os.path.basename(part)[: -len(".part")],
        disable=not progress,
    )
    try:
        # Unbuffered, and each chunk as it arrives (read1): what was received is on disk for a
        # resume however the process ends.
        with bar, open(part, "ab" if resumed else "wb", buffering=0) as f:
            while chunk := response.read1(_CHUNK):
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    except OSError as err:
        raise DownloadError(
            f"{url}: the transfer broke off after {resumed + got} bytes ({err}); run the same "
            "command again to resume"
        ) from err
    if total is not None and resumed + got < total:
        raise DownloadError(
            f"{url}: the transfer broke off at {resumed + got} of {total} bytes; run the same "
            "command again to resume"
        )
    return got


def _verify(path: str, md5: str, remove: bool) -> None:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != md5.lower():
        if remove:
            os.remove(path)
        raise DownloadError(
            f"{path}: MD5 {digest.hexdigest()} is not the expected {md5.lower()}"
            + ("; the download was removed, run the same command again" if remove else "")
        )


def _unpack(archive: str, task: str, out: str) -> int:
    """Unpacks the archive's ``task/`` folder into ``out/task`` atomically; returns the number
    of ``._*`` members dropped."""
    staging = tempfile.mkdtemp(prefix=f".{task}.unpacking-", dir=out)
    try:
        try:
            with tarfile.open(archive) as tar:
                members, dropped = _members(tar, archive)
                # The "data" filter (where this Python has it) also refuses special files and
                # links that leave the folder, and drops unsafe permission bits.
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(staging, members=members, **safe)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DownloadError(f"{archive}: not a readable tar archive ({err})") from err
        unpacked = os.path.join(staging, task)
        if not os.path.isdir(unpacked):
            found = ", ".join(sorted(os.listdir(staging))) or "nothing"
            raise DownloadError(f"{archive} holds no folder {task}/ (it holds {found})")
        _check_task(unpacked, "was unpacked but", shown=os.path.join(out, task))
        os.rename(unpacked, os.path.join(out, task))
        return dropped
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _members(tar: tarfile.TarFile, archive: str) -> tuple[list[tarfile.TarInfo], int]:
    """The members to unpack: regular files and folders inside the archive, without ``._*``."""
    keep, dropped = [], 0
    for member in tar.getmembers():
        name = os.path.normpath(member.name)
        if os.path.basename(name).startswith("._"):
            dropped += 1
            continue
        if os.path.isabs(name) or name.split(os.sep)[0] == "..":
            raise DownloadError(f"{archive}: member {member.name} would land outside the folder")
        if not (member.isfile() or member.isdir()):
            raise DownloadError(f"{archive}: member {member.name} is not a file or a folder")
        keep.append(member)
    return keep, dropped


def _check_task(folder: str, what: str, shown: str | None = None) -> None:
    from tf_medseg.data.io import DataError
    from tf_medseg.data.msd import load_task

    try:
        load_task(folder)
    except DataError as err:
        raise DownloadError(f"{shown or folder} {what} does not read as a task: {err}") from err

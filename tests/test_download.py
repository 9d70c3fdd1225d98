"""tf-medseg-download against a real HTTP server on the loopback address, serving a tar made from
a synthetic task: good, corrupt, broken off and resumed, interrupted and resumed, no network."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from tf_medseg.data.download import DownloadError, fetch_task
from tf_medseg.data.msd import load_task
from tf_medseg.data.synthetic import generate_task

TASK = "Task09_Spleen"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> bytes:
    """A tar of a tiny synthetic task laid out as the MSD's (``Task09_Spleen/...``), with a
    macOS ``._`` file beside each image, as the Decathlon's archives have."""
    root = tmp_path_factory.mktemp("archive")
    folder = generate_task("spleen", str(root / TASK), num_train=3, num_test=1, size=16, seed=0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=TASK)
        for name in sorted(os.listdir(os.path.join(folder, "imagesTr"))):
            info = tarfile.TarInfo(f"{TASK}/imagesTr/._{name}")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"\x00\x05\x16\x07"))
    return buffer.getvalue()


class Server:
    """Serves ``body`` at ``/TASK.tar`` with ``Range`` support; can break off the first answer
    after ``cut`` bytes, or send slowly. Records each request's ``Range`` header."""

    def __init__(self, body: bytes, cut: int | None = None, bytes_per_s: float | None = None):
        self.body, self.cut, self.bytes_per_s = body, cut, bytes_per_s
        self.ranges: list[str | None] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.ranges.append(self.headers.get("Range"))
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                end = len(body)
                if owner.cut is not None:
                    end, owner.cut = min(end, start + owner.cut), None
                owner.send(self.wfile, body[start:end])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{TASK}.tar"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def send(self, out, data: bytes) -> None:
        step = 4096
        for i in range(0, len(data), step):
            try:
                out.write(data[i : i + step])
            except OSError:
                return
            if self.bytes_per_s:
                time.sleep(step / self.bytes_per_s)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _cli(*flags, timeout=120):
    command = [sys.executable, "-m", "tf_medseg.cli.download", f"--task={TASK}", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("tf-medseg-download:"), result.stderr[-2000:]
    return lines[-1]


def test_the_public_tasks_are_the_ten_decathlon_tasks_with_md5_sums():
    from tf_medseg.data.download import MSD_TASKS

    assert [name[:6] for name in MSD_TASKS] == [f"Task{i:02d}" for i in range(1, 11)]
    for url, md5 in MSD_TASKS.values():
        assert url.startswith("https://") and url.endswith(".tar")
        assert len(md5) == 32 and int(md5, 16) >= 0


def test_a_good_download_is_verified_unpacked_without_macos_files_and_reads(archive, tmp_path):
    server = Server(archive)
    try:
        result = _cli(f"--out={tmp_path}", f"--url={server.url}", f"--md5={_md5(archive)}")
    finally:
        server.close()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MD5 verified" in result.stdout and "3 macOS ._* files dropped" in result.stdout
    folder = tmp_path / TASK
    task = load_task(str(folder))
    assert len(task.training) == 3
    assert not [n for n in os.listdir(folder / "imagesTr") if n.startswith("._")]
    assert sorted(os.listdir(tmp_path)) == [TASK], "no archive, part file or staging folder left"
    # Again: the task is there, nothing is fetched.
    again = _cli(f"--out={tmp_path}", f"--url={server.url}", f"--md5={_md5(archive)}")
    assert again.returncode == 0 and "already there" in again.stdout
    assert server.ranges == [None]


def test_a_corrupt_download_is_refused_before_unpacking_and_removed(archive, tmp_path):
    corrupt = bytearray(archive)
    corrupt[len(corrupt) // 2] ^= 0xFF
    server = Server(bytes(corrupt))
    try:
        line = _one_line_error(
            _cli(f"--out={tmp_path}", f"--url={server.url}", f"--md5={_md5(archive)}")
        )
    finally:
        server.close()
    assert f"MD5 {_md5(bytes(corrupt))} is not the expected {_md5(archive)}" in line
    assert os.listdir(tmp_path) == [], "nothing unpacked, the bad download removed"


def test_a_transfer_broken_off_is_said_and_the_same_command_resumes_it(archive, tmp_path):
    server = Server(archive, cut=len(archive) // 3)
    flags = (f"--out={tmp_path}", f"--url={server.url}", f"--md5={_md5(archive)}")
    try:
        line = _one_line_error(_cli(*flags))
        assert f"broke off at {len(archive) // 3} of {len(archive)} bytes" in line
        assert "run the same command again to resume" in line
        assert not (tmp_path / TASK).exists(), "no half task"
        result = _cli(*flags)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed after {len(archive) // 3 / 2**20:.1f} MB" in result.stdout
    assert server.ranges == [None, f"bytes={len(archive) // 3}-"]
    assert len(load_task(str(tmp_path / TASK)).training) == 3


def test_an_interrupted_download_resumes_where_it_stopped(archive, tmp_path):
    """Ctrl-C during a slow download, then the same command: a Range request continues it."""
    server = Server(archive, bytes_per_s=len(archive) / 6)
    flags = (f"--out={tmp_path}", f"--url={server.url}", f"--md5={_md5(archive)}")
    part = tmp_path / f"{TASK}.tar.part"
    command = [sys.executable, "-m", "tf_medseg.cli.download", f"--task={TASK}", *flags]
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline and (not part.exists() or part.stat().st_size < 20000):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stderr[-2000:]
        assert b"Traceback" not in stderr and b"run the same command again to resume" in stderr
        kept = part.stat().st_size
        assert 0 < kept < len(archive)
        server.bytes_per_s = None
        result = _cli(*flags)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr[-2000:]
    assert server.ranges[-1] == f"bytes={kept}-"
    assert len(load_task(str(tmp_path / TASK)).training) == 3


def test_no_network_is_one_line(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    line = _one_line_error(_cli(f"--out={tmp_path}", f"--url=http://127.0.0.1:{port}/{TASK}.tar"))
    assert "cannot reach" in line and "--url=PATH" in line


def test_a_local_file_is_unpacked_and_a_truncated_or_wrong_one_refused(archive, tmp_path):
    tar = tmp_path / "copy.tar"
    tar.write_bytes(archive)
    result = _cli(f"--out={tmp_path / 'a'}", f"--url={tar}", f"--md5={_md5(archive)}")
    assert result.returncode == 0 and "MD5 verified" in result.stdout
    assert tar.exists(), "a local archive is the user's: it is kept"
    # Without --md5 a line says it is not verified; a truncated tar is not readable.
    cut = tmp_path / "cut.tar"
    cut.write_bytes(archive[: len(archive) // 2])
    result = _cli(f"--out={tmp_path / 'b'}", f"--url={cut}")
    assert "is not verified" in result.stdout
    assert "not a readable tar archive" in _one_line_error(result)
    assert not (tmp_path / "b" / TASK).exists()
    assert [n for n in os.listdir(tmp_path / "b") if n.startswith(".")] == []
    # A tar of something else.
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w") as f:
        f.add(str(tar), arcname="Task02_Heart/readme.txt")
    line = _one_line_error(_cli(f"--out={tmp_path / 'c'}", f"--url={other}"))
    assert f"holds no folder {TASK}/ (it holds Task02_Heart)" in line


def test_an_unknown_task_names_the_ten(tmp_path):
    with pytest.raises(DownloadError, match="Task09_Spleen"):
        fetch_task("Task11_Nothing", str(tmp_path))

"""Extraction that reads a bundle while it is downloaded (executor.bundle.growing), with real threads."""
from __future__ import annotations

import os
import threading
import time

import pytest

from executor.bundle import archive
from executor.bundle.growing import Abandoned, GrowingFile


def _bundle(tmp_path) -> bytes:
    src = tmp_path / "src"
    for i in range(24):
        (src / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"pkg{i % 3}" / f"mod{i:02d}.py").write_bytes(os.urandom(16 << 10))  # incompressible: bytes arrive in file order
    return open(archive.build(str(src), str(tmp_path / "out")), "rb").read()


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)


@pytest.mark.usefixtures("extraction_threads")
@pytest.mark.parametrize("writer", ["thread", "forked process"])
def test_extraction_reads_the_archive_while_it_is_written(tmp_path, writer):
    """Files appear in staging before the last bytes of the archive are written: the writer holds
    back its last chunk until it sees one (it gives up after 10 s, and the test fails). The writer
    may be a thread or a forked process (storage runs obstore's attempts in one)."""
    data = _bundle(tmp_path)
    path, staging = tmp_path / "download.tar.gz", tmp_path / "staging"
    staging.mkdir()
    growing = GrowingFile()

    def write() -> bool:
        seen = False
        with open(path, "wb") as f:
            growing.begin(str(path), len(data))
            chunk = len(data) // 8 + 1
            for start in range(0, len(data), chunk):
                if start + chunk >= len(data):  # the last chunk: only once extraction has produced a file
                    deadline = time.monotonic() + 10
                    while not _files(staging) and time.monotonic() < deadline:
                        time.sleep(0.01)
                    seen = bool(_files(staging))
                f.write(data[start:start + chunk])
                f.flush()
                growing.grow(f.tell())
        return seen

    if writer == "thread":
        seen: list[bool] = []
        thread = threading.Thread(target=lambda: seen.append(write()))
        thread.start()
        finish = thread.join
    else:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if write() else 1)

        def finish():
            seen.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0)
        seen = []
    try:
        extracted = archive.extract(growing, str(staging))
    finally:
        finish()
        growing.end()
        growing.close()
    assert seen == [True]
    assert len(extracted.files) == 24 and _files(staging) == sorted(extracted.files)
    reference = tmp_path / "reference"
    reference.mkdir()
    path.write_bytes(data)
    assert archive.extract(str(path), str(reference)).content_digest == extracted.content_digest is not None


def _reader_error(growing: GrowingFile) -> tuple[list, threading.Thread, list]:
    """A thread reading `growing` to its end: the Abandoned it got, itself, the bytes it read."""
    errors: list = []
    got: list = []

    def read() -> None:
        try:
            while data := growing.read(1 << 16):
                got.append(len(data))
        except Abandoned as e:
            errors.append(e)

    thread = threading.Thread(target=read)
    thread.start()
    return errors, thread, got


@pytest.mark.parametrize("stop", ["retried", "ended short", "interrupted"])
def test_a_waiting_reader_is_abandoned(tmp_path, stop):
    """The download is retried (its second attempt is not followed), ends short, or the reader stops."""
    path = tmp_path / "a"
    path.write_bytes(b"x" * 200_000)
    growing = GrowingFile()
    assert growing.begin(str(path), 200_000)
    growing.grow(100_000)
    errors, reader, got = _reader_error(growing)
    time.sleep(0.05)
    assert reader.is_alive() and sum(got) == 100_000  # it has read what is complete and waits for more
    if stop == "retried":
        growing.begin(str(path), 200_000)  # a second attempt: not followed
    elif stop == "ended short":
        growing.end()
    else:
        growing.interrupt()
    reader.join(10)
    assert not reader.is_alive() and len(errors) == 1
    assert growing.followed_attempt_failed == (stop != "interrupted")
    growing.close()


def test_a_complete_download_reads_to_its_end_and_a_failed_start_abandons(tmp_path):
    path = tmp_path / "a"
    path.write_bytes(b"0123456789")
    growing = GrowingFile()
    growing.begin(str(path), 10)
    growing.grow(10)
    growing.end()
    assert growing.read(4) + growing.read(100) == b"0123456789" and growing.read(1) == b""
    growing.close()
    never_began = GrowingFile()
    never_began.end()  # e.g. the object does not exist
    with pytest.raises(Abandoned):
        never_began.size()

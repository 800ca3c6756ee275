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
def test_extraction_reads_the_archive_while_it_is_written(tmp_path):
    """Files appear in staging before the last bytes of the archive are written: the writer holds
    back its last chunk until it sees one (it gives up after 10 s, and the test fails)."""
    data = _bundle(tmp_path)
    path, staging = tmp_path / "download.tar.gz", tmp_path / "staging"
    staging.mkdir()
    growing = GrowingFile()
    seen_before_the_end: list[bool] = []

    def write() -> None:
        with open(path, "wb") as f:
            assert growing.begin(str(path), len(data))
            chunk = len(data) // 8 + 1
            for start in range(0, len(data), chunk):
                if start + chunk >= len(data):  # the last chunk: only once extraction has produced a file
                    deadline = time.monotonic() + 10
                    while not _files(staging) and time.monotonic() < deadline:
                        time.sleep(0.01)
                    seen_before_the_end.append(bool(_files(staging)))
                f.write(data[start:start + chunk])
                f.flush()
                growing.grow(f.tell())
        growing.end()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        extracted = archive.extract(growing, str(staging))
    finally:
        writer.join()
        growing.close()
    assert seen_before_the_end == [True]
    assert len(extracted.files) == 24 and _files(staging) == sorted(extracted.files)
    reference = tmp_path / "reference"
    reference.mkdir()
    path.write_bytes(data)
    assert archive.extract(str(path), str(reference)).content_digest == extracted.content_digest is not None


def _reader_error(growing: GrowingFile) -> list:
    errors: list = []

    def read() -> None:
        try:
            while growing.read(1 << 16):
                pass
        except Abandoned as e:
            errors.append(e)

    thread = threading.Thread(target=read)
    thread.start()
    return errors, thread


@pytest.mark.parametrize("stop", ["retried", "ended short", "interrupted"])
def test_a_waiting_reader_is_abandoned(tmp_path, stop):
    """The download is retried (its second attempt is not followed), ends short, or the reader stops."""
    path = tmp_path / "a"
    path.write_bytes(b"x" * 100)
    growing = GrowingFile()
    assert growing.begin(str(path), 100)
    growing.grow(40)
    errors, reader = _reader_error(growing)
    time.sleep(0.05)
    assert reader.is_alive()  # it has read the 40 bytes and waits for more
    if stop == "retried":
        assert growing.begin(str(path), 100) is False
    elif stop == "ended short":
        growing.end()
    else:
        growing.interrupt()
    reader.join(10)
    assert not reader.is_alive() and len(errors) == 1
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

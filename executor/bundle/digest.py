"""The content digest in a bundle's name, computed exactly as flytekit's `ls_files` does.

md5 over the files sorted by path; for each file its bytes, then its relative path with the
separators removed. So it can be recomputed over an extracted tree and compared with the name.
"""
from __future__ import annotations

import os
import re
import stat

_NAME = re.compile(r"^fast([0-9a-f]{32})\.tar\.gz$")
_BLOCK = 1 << 20


def digest_from_name(uri: str) -> str | None:
    """The md5 in `.../fast<md5>.tar.gz`, or None for any other name."""
    match = _NAME.match(uri.rstrip("/").rsplit("/", 1)[-1])
    return match.group(1) if match else None


def list_files(root: str, skip_dirs: frozenset[str] = frozenset()) -> list[str]:
    """Relative paths of the regular files under root (symlinks to existing files count, as in flytekit)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.exists(path) or stat.S_ISSOCK(os.stat(path).st_mode):
                continue
            found.append(os.path.relpath(path, root))
    return sorted(found, key=lambda rel: os.path.join(root, rel))


class ContentHasher:
    """The name digest fed one file at a time, in order: its bytes, then end_file(rel).

    With background=True a thread of its own hashes, so that extraction's parsing thread only
    gathers small pieces into batches of about 1 MiB for it: md5 releases the GIL for each update,
    and getting it back while other threads run costs more than hashing a few KiB. Use it as a
    context manager then (leaving it stops the thread). Without, every piece is hashed at once.
    expected_bytes picks the md5 implementation (executor.md5).
    """

    _BATCH = 1 << 20
    _QUEUED = 8  # batches waiting for the hashing thread: bounds the memory held for it

    def __init__(self, background: bool = False, expected_bytes: int = 0):
        from executor.md5 import md5

        self._md5 = md5(expected_bytes, threaded=background)
        self._batch: list = []
        self._batched = 0
        self._queue = self._thread = None
        if background:
            import queue
            import threading

            self._queue = queue.Queue(self._QUEUED)
            self._thread = threading.Thread(target=self._run, name="executor-hash", daemon=True)
            self._thread.start()

    def update(self, data) -> None:
        if self._queue is None:
            self._md5.update(data)
            return
        self._batch.append(data)
        self._batched += len(data)
        if self._batched >= self._BATCH:
            self._flush()

    def end_file(self, rel: str) -> None:
        self.update("".join(rel.split(os.sep)).encode("utf-8"))

    def hexdigest(self) -> str:
        self._flush()
        self._stop()
        return self._md5.hexdigest()

    def _flush(self) -> None:
        if self._batch:
            batch, self._batch, self._batched = self._batch, [], 0
            self._queue.put(batch)

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            self._md5.update(batch[0] if len(batch) == 1 else b"".join(batch))

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "ContentHasher":
        return self

    def __exit__(self, *exc) -> None:
        self._stop()


def content_digest(root: str, files: list[str] | None = None, expected_bytes: int = 0) -> str:
    hasher = ContentHasher(expected_bytes=expected_bytes)
    for rel in files if files is not None else list_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            while chunk := f.read(_BLOCK):
                hasher.update(chunk)
        hasher.end_file(rel)
    return hasher.hexdigest()

"""A download that extraction reads while it arrives.

The downloading thread (storage.download_hashed, given this as its `progress`) writes the archive
front to back into its temp file and says how far the bytes are complete; extraction reads that
prefix through its own descriptor and waits at its end. A cold bundle from a store then costs about
the longer of download and extraction, not their sum, and the archive's bytes are still read once
from the network and hashed once.

Only the first download attempt is followed: if it fails and storage retries, the reader gets
Abandoned and the caller extracts the finished download afterwards, as before.
"""
from __future__ import annotations

import os
import threading


class Abandoned(Exception):
    """The download this file follows was not completed by its first attempt (or the reader stopped)."""


class GrowingFile:
    def __init__(self):
        self._changed = threading.Condition()
        self._fd = -1
        self._size: int | None = None
        self._ready = 0  # bytes at the front of the file that are complete
        self._pos = 0
        self._began = False
        self._over = False  # the writer is done with it (complete, failed or retried)
        self._interrupted = False
        self.retried = False  # a second attempt began: what was read may not be what was finally downloaded

    # --- the downloading thread ------------------------------------------------------------------

    def begin(self, path: str, size: int) -> bool:
        """A download attempt starts writing `path` (`size` bytes in all). False from the second
        attempt on: it is not followed (the reader is told Abandoned)."""
        with self._changed:
            if self._began or self._over:
                self.retried = self._began
                self._over = True
                self._changed.notify_all()
                return False
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._began, self._size = True, size
            self._changed.notify_all()
            return True

    def grow(self, ready: int) -> None:
        """The first `ready` bytes of the file are written and final."""
        with self._changed:
            self._ready = ready
            self._changed.notify_all()

    def end(self) -> None:
        """The writer is done: after the last grow() of a complete download, or after a failure."""
        with self._changed:
            self._over = True
            self._changed.notify_all()

    # --- the extracting thread -------------------------------------------------------------------

    def size(self) -> int:
        """The archive's size (waits for the download to begin)."""
        with self._changed:
            self._wait(lambda: self._began)
            return self._size

    def read(self, n: int) -> bytes:
        """Up to n bytes from the current position: b"" only at the end of a complete download."""
        with self._changed:
            self._wait(lambda: self._ready > self._pos or self._ready == self._size)
            available = min(n, self._ready - self._pos)
        if available <= 0:
            return b""
        data = os.pread(self._fd, available, self._pos)
        self._pos += len(data)
        return data

    def _wait(self, ready) -> None:
        while not ready():
            if self._interrupted or (self._over and not ready()):
                raise Abandoned("the download was retried or failed; the archive is extracted once it is complete")
            self._changed.wait()

    def interrupt(self) -> None:
        """Make a read that waits (or the next one) raise Abandoned: the reader is stopping."""
        with self._changed:
            self._interrupted = True
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

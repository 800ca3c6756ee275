"""A download that extraction reads while it arrives.

The downloading side (storage.download_hashed, given this as its `progress`) writes the archive
front to back into its temp file and says how far the bytes are complete; extraction reads that
prefix through its own descriptor and waits at its end. A cold bundle from a store then costs about
the longer of download and extraction, not their sum, and the archive's bytes are still read once
from the network and hashed once.

The downloading side tells the reading side over a pipe, as one short line per event, so it may be
another thread or a forked process (storage runs obstore's attempts in a forked child where the
process forks workers later): nothing is shared but the pipe and the file.

Only the first download attempt is followed: if storage retries, the reader gets Abandoned (and
`followed_attempt_failed` is set) and the caller extracts the finished download afterwards, as before.
"""
from __future__ import annotations

import json
import os

_MOST_GROWS = 1024  # "grow" lines per attempt at most (the pipe holds them all: 64 KiB), the last one always
_LEAST_GROW = 64 << 10


class Abandoned(Exception):
    """The download this file follows was not completed by its first attempt (or the reader stopped)."""


class GrowingFile:
    def __init__(self):
        self._events_r, self._events_w = os.pipe()
        os.set_blocking(self._events_r, False)
        self._pending = b""
        # the reading side's view
        self._fd = -1
        self._size: int | None = None
        self._ready = 0  # bytes at the front of the file that are complete
        self._pos = 0
        self._over = False  # the writer is done with it (complete, failed or retried)
        self._interrupted = False
        self.followed_attempt_failed = False  # what was read may not be what was finally downloaded
        # the writing side's own (in whichever process writes)
        self._writing_size = 0
        self._told = 0
        self._grow_every = _LEAST_GROW

    # --- the downloading side (a thread, or a forked child) -------------------------------------------

    def begin(self, path: str, size: int, final: str | None = None) -> bool:
        """A download attempt starts writing `path` (`size` bytes in all), to be renamed to `final`
        once complete. The reader follows the first attempt only; a later one ends the following
        (decided by the reader: a writer in a forked child cannot know, so this always says True)."""
        self._writing_size, self._told = size, 0
        self._grow_every = max(_LEAST_GROW, size // _MOST_GROWS)
        self._tell(["begin", size, path, final])
        return True

    def grow(self, ready: int) -> None:
        """The first `ready` bytes of the file are written and final."""
        if ready - self._told >= self._grow_every or ready == self._writing_size:
            self._told = ready
            self._tell(["grow", ready])

    def end(self) -> None:
        """The writer is done: after the last grow() of a complete download, or after a failure."""
        self._tell(["end"])

    def _tell(self, event: list) -> None:
        os.write(self._events_w, json.dumps(event).encode() + b"\n")  # one write under PIPE_BUF: atomic

    # --- the reading side ------------------------------------------------------------------------------

    def size(self) -> int:
        """The archive's size (waits for the download to begin)."""
        while self._size is None:
            self._check_going()
            self._receive(block=True)
        return self._size

    def read(self, n: int) -> bytes:
        """Up to n bytes from the current position: b"" only at the end of a complete download."""
        self._receive(block=False)
        while self._ready <= self._pos:
            if self._size is not None and self._ready == self._size:
                return b""
            self._check_going()
            self._receive(block=True)
        data = os.pread(self._fd, min(n, self._ready - self._pos), self._pos)
        self._pos += len(data)
        return data

    def interrupt(self) -> None:
        """Make a read that waits (or the next one) raise Abandoned: the reader is stopping."""
        self._tell(["interrupt"])

    def join_writer(self, thread) -> None:
        """Wait for the downloading thread to end, taking in what it says meanwhile (a reader that
        stopped must not leave the writer blocked on a full pipe)."""
        import select

        while thread.is_alive():
            select.select([self._events_r], [], [], 0.1)
            self._receive(block=False)
        self._receive(block=False)

    def _check_going(self) -> None:
        if self._interrupted or self._over:
            raise Abandoned("the download was retried or failed; the archive is extracted once it is complete")

    def _receive(self, block: bool) -> None:
        """Apply the events written so far (block: wait for at least one)."""
        while True:
            if block:
                import select

                select.select([self._events_r], [], [])
            try:
                chunk = os.read(self._events_r, 65536)
            except BlockingIOError:
                chunk = b""
            *lines, self._pending = (self._pending + chunk).split(b"\n")
            for line in lines:
                self._apply(json.loads(line))
            if lines or not block:
                return

    def _apply(self, event: list) -> None:
        kind = event[0]
        if kind == "interrupt":
            self._interrupted = True
        elif self._over:
            return  # after a retry or the end: nothing more is followed
        elif kind == "begin":
            if self._size is not None:  # a second attempt
                self.followed_attempt_failed = self._over = True
                return
            # The writer may be done (the file renamed to its final name) before this reads its "begin".
            for path in filter(None, event[2:4]):
                try:
                    self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    break
                except FileNotFoundError:
                    continue
            else:  # the attempt failed and its file is gone: the retried download is extracted whole
                self.followed_attempt_failed = self._over = True
                return
            self._size = event[1]
        elif kind == "grow":
            self._ready = event[1]
        elif kind == "end":
            if self._ready != self._size:  # an attempt that did not complete: not read on from here
                self.followed_attempt_failed = self._over = True

    def close(self) -> None:
        """After the writer is done (join_writer)."""
        for fd in (self._fd, self._events_r, self._events_w):
            if fd >= 0:
                os.close(fd)
        self._fd = self._events_r = self._events_w = -1

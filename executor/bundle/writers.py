"""A few threads that create and write files handed to them in order, one lane per directory.

Creating a file is the dearest step of extracting many small ones (the kernel allocates an inode
and updates the directory under the directory's lock) and it releases the GIL, so it runs here
while the caller keeps decompressing and hashing. Files of one directory always go to the same
lane, in order: lanes never contend for a directory lock, and a large file's pieces arrive in
order. The bytes handed over but not yet written are capped, so memory stays bounded.

The caller owns every decision about what may be written where; a lane only runs `open_file`
(given by the caller) and os.write. The first error in any lane stops all of them and is raised
in the caller's thread, by a later submit() or by wait().
"""
from __future__ import annotations

import os

LANES = 3
BUDGET_BYTES = 32 << 20  # handed over but not yet written
# Consecutive ops for one lane travel together, up to these: each hand-over costs a lock, a queue
# put and often a thread wakeup, more than writing a small file's bytes.
BATCH_BYTES = 256 << 10
BATCH_OPS = 32


class Writers:
    """Use as a context manager: leaving it stops and joins the lanes (nothing writes after it).

    lanes=0 writes in the caller's thread, within submit(): for small bundles, where handing
    files over costs more than the overlap gains.
    """

    def __init__(self, open_file, lanes: int = LANES, budget: int = BUDGET_BYTES):
        """open_file(*open_args) -> fd opens each file handed over."""
        self._open_file = open_file
        self._inline_fd: int | None = None  # lanes=0: the file being written
        self._budget = budget
        self._pending = 0  # ops handed over and not yet done
        self._pending_bytes = 0
        self._error: BaseException | None = None
        self._queues: list = []
        self._threads: list = []
        self._current = 0  # lane of the file being handed over
        self._batch: list = []  # ops for the current lane, not handed over yet
        self._batch_bytes = 0
        if lanes:
            import queue  # lanes only: a small bundle's extraction does not import them
            import threading

            self._changed = threading.Condition()
            self._queues = [queue.SimpleQueue() for _ in range(lanes)]
            self._threads = [threading.Thread(target=self._lane, args=(q,), name=f"executor-write-{i}", daemon=True)
                             for i, q in enumerate(self._queues)]

    # --- the caller's side ------------------------------------------------------------------

    def submit(self, open_args: tuple | None, pieces: list, size: int, last: bool) -> None:
        """Hand over a file's next pieces (`size` bytes in all): open_args (passed to open_file)
        starts a new file; None continues the previous one; last closes it."""
        if not self._queues:
            self._inline_fd = self._write(self._inline_fd, open_args, pieces, last)
            return
        if open_args is not None:
            lane = hash(os.path.dirname(open_args[0])) % len(self._queues)
            if lane != self._current:
                self._flush()
                self._current = lane
            if self._threads[lane].ident is None:
                self._threads[lane].start()  # lanes start with their first file: small bundles use few
        self._batch.append((open_args, pieces, last))
        self._batch_bytes += size
        if self._batch_bytes >= BATCH_BYTES or len(self._batch) >= BATCH_OPS:
            self._flush()

    def _flush(self) -> None:
        """Hand the batched ops to the current lane, within the budget."""
        if not self._batch:
            return
        batch, size = self._batch, self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        with self._changed:
            while self._pending and self._pending_bytes + size > self._budget and self._error is None:
                self._changed.wait()
            self._raise_error()
            self._pending += 1
            self._pending_bytes += size
        self._queues[self._current].put((batch, size))

    def wait(self) -> None:
        """Return once everything handed over is written (or raise the first error)."""
        if not self._queues:
            return  # inline: written within submit()
        self._flush()
        with self._changed:
            while self._pending and self._error is None:
                self._changed.wait()
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "Writers":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self._flush()  # nothing handed over is dropped, also without a wait()
        finally:
            self._stop(exc[1])

    def _stop(self, error: BaseException | None) -> None:
        if self._inline_fd is not None:
            os.close(self._inline_fd)
        if error is not None and self._queues:
            with self._changed:
                self._error = self._error or error  # lanes skip whatever is still queued
        for q, thread in zip(self._queues, self._threads):
            if thread.ident is not None:  # started
                q.put(None)
                thread.join()

    # --- a lane -----------------------------------------------------------------------------

    def _lane(self, ops) -> None:
        fd = None
        while (op := ops.get()) is not None:
            batch, size = op
            for open_args, pieces, last in batch:
                try:
                    if self._error is None:
                        fd = self._write(fd, open_args, pieces, last)
                    elif last and fd is not None:
                        os.close(fd)
                        fd = None
                except BaseException as e:
                    fd = None  # _write closed it
                    with self._changed:
                        self._error = self._error or e
            with self._changed:
                self._pending -= 1
                self._pending_bytes -= size
                self._changed.notify()
        if fd is not None:
            os.close(fd)

    def _write(self, fd: int | None, open_args: tuple | None, pieces: list, last: bool) -> int | None:
        """One handed-over op: open (open_args), write, close (last); returns the fd still open.
        On an error the fd is closed before it is raised."""
        try:
            if open_args is not None:
                fd = self._open_file(*open_args)
            for piece in pieces:
                while piece:
                    piece = piece[os.write(fd, piece):]
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if last:
            os.close(fd)
            return None
        return fd

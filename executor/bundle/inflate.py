"""A gzip file decompressed ahead in a thread, read as a forward-only stream (what tarstream needs).

zlib (or isal, see gzip_codec) releases the GIL while it inflates, so decompression runs on its
own core while the caller parses and hands data to the hasher and the writers: `tar xzf` gets the same overlap from its separate
`gzip` process. Data comes out as memoryviews of the decompressed blocks, so file contents are not
copied on their way to the hasher and to os.write.
"""
from __future__ import annotations

import os
import zlib

READ_BYTES = 256 << 10  # compressed bytes per read
BLOCK_BYTES = 1 << 20  # decompressed bytes per block handed over
DEPTH = 8  # blocks decompressed ahead of the reader: bounds memory, also for decompression bombs
_END = object()


def gzip_codec():
    """isal's inflate when it is installed (about twice zlib's speed, the same CRC and length
    checks), else zlib; EXECUTOR_BUNDLE_INFLATE=zlib insists on zlib."""
    if os.environ.get("EXECUTOR_BUNDLE_INFLATE", "auto") != "zlib":
        try:
            from isal import isal_zlib

            return isal_zlib
        except ImportError:
            pass
    return zlib


class Inflater:
    """Use as a context manager: leaving it stops and joins the thread.

    threaded=False decompresses in the reader's own thread, block by block as it reads: for small
    archives, where starting a thread and handing blocks over costs more than the overlap gains.
    """

    def __init__(self, path, archive_hasher=None, threaded: bool = True):
        """path: a file's path, or a growing.GrowingFile (read as it is downloaded). archive_hasher
        (an md5 object), when given, is fed every byte of the file as it is read, and by
        hash_rest() whatever comes after what extraction needed."""
        self._archive_hasher = archive_hasher
        self._codec = gzip_codec()
        self._stop = False
        self._block = memoryview(b"")
        self._at = 0  # read position inside _block
        self._offset = 0  # stream offset of _block[_at]
        self._ended = False
        self._opened = isinstance(path, str)
        self._file = open(path, "rb", buffering=0) if self._opened else path
        self._inline = None if threaded else self._inflate(self._file)
        self._thread = None
        if threaded:
            import queue  # a small bundle's extraction does without them
            import threading

            self._blocks = queue.Queue(DEPTH)
            self._full, self._empty = queue.Full, queue.Empty
            self._thread = threading.Thread(target=self._run, name="executor-inflate", daemon=True)
            self._thread.start()

    # --- decompressing (in the thread, or inline) ---------------------------------------------

    def _run(self) -> None:
        try:
            for block in self._inflate(self._file):
                self._put(block)
            self._put(_END)
        except BaseException as e:  # handed to the reader, raised there
            self._put(e)

    def _inflate(self, f):
        """Yield the decompressed blocks of the gzip file f."""
        gz = self._codec.decompressobj(31)  # gzip wrapper: zlib checks the CRC-32 and length trailer
        data = b""
        while not self._stop:
            if not data:
                data = f.read(READ_BYTES)
                if not data:
                    break
                if self._archive_hasher is not None:
                    self._archive_hasher.update(data)
            if gz.eof:  # gzip allows members back to back, and zero padding after the last one
                data = data.lstrip(b"\0")
                if not data:
                    continue
                if not b"\x1f\x8b".startswith(data[:2]):  # judged here, alike for zlib and isal
                    raise ValueError("data after the gzip stream is neither another gzip member nor zero padding")
                gz = self._codec.decompressobj(31)
            out = gz.decompress(data, BLOCK_BYTES)
            data = gz.unconsumed_tail or gz.unused_data
            if out:
                yield out
        if not gz.eof and not self._stop:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")

    def _put(self, item) -> None:
        while not self._stop:
            try:
                self._blocks.put(item, timeout=0.1)
                return
            except self._full:
                continue

    # --- the reader -------------------------------------------------------------------------

    def _next_block(self) -> bool:
        if self._ended:
            return False
        try:
            item = self._blocks.get() if self._inline is None else next(self._inline, _END)
        except BaseException as e:
            item = e
        if item is _END:
            self._ended = True
            return False
        if isinstance(item, BaseException):
            self._ended = True
            if isinstance(item, (zlib.error, self._codec.error)):
                raise ValueError(f"not a valid gzip stream: {item}") from item
            raise item
        self._block, self._at = memoryview(item), 0
        return True

    def _piece(self, size: int) -> memoryview | None:
        """At most `size` bytes, from the current block; None at the end of the gzip stream."""
        if self._at == len(self._block) and not self._next_block():
            return None
        piece = self._block[self._at: self._at + size]
        self._at += len(piece)
        self._offset += len(piece)
        return piece

    def views(self, size: int):
        """Yield the next `size` bytes as memoryviews of the decompressed blocks (no copy)."""
        while size:
            piece = self._piece(size)
            if piece is None:
                raise EOFError("unexpected end of data")
            size -= len(piece)
            yield piece

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes, fewer only at the end of the gzip stream."""
        if size < 0:
            raise ValueError("Inflater reads a known size")
        pieces = []
        while size and (piece := self._piece(size)) is not None:
            size -= len(piece)
            pieces.append(piece)
        return b"".join(pieces)

    def tell(self) -> int:
        return self._offset

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset < self._offset:
            raise ValueError("Inflater only seeks forward")
        for _ in self.views(offset - self._offset):
            pass
        return self._offset

    def finish(self, slack: int = 1 << 20) -> None:
        """After the tar end marker: read what little follows, so zlib checks the gzip trailer.

        More than `slack` bytes after the archive are ignored unread, as tar itself ignores them.
        """
        left = slack - (len(self._block) - self._at)
        self._at = len(self._block)
        while left >= 0 and self._next_block():
            left -= len(self._block)
            self._at = len(self._block)

    def hash_rest(self) -> None:
        """After finish(): stop decompressing, then feed archive_hasher the bytes not read yet."""
        self._stop_decompressing()
        while chunk := self._file.read(READ_BYTES):
            self._archive_hasher.update(chunk)

    def __enter__(self) -> "Inflater":
        return self

    def __exit__(self, *exc) -> None:
        self._stop_decompressing()
        if self._opened:
            self._file.close()  # a growing file is its owner's to close

    def _stop_decompressing(self) -> None:
        self._stop = True
        if hasattr(self._file, "interrupt"):  # a growing file: a read waiting for the download returns now
            self._file.interrupt()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._blocks.get(timeout=0.1)
                except self._empty:
                    pass
            self._thread.join()

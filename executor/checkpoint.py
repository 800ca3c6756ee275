"""Checkpoints for plain functions, in flytekit's SyncCheckpoint layout (flytekit tasks use flytekit's own).

    from executor.checkpoint import current
    cp = current()
    state = cp.read()            # bytes of the previous attempt's checkpoint, or None (restored lazily)
    cp.write(b"...")             # uploads <checkpoint-path>/_dst_cp now
    cp.save("model.pt")          # uploads a file (or a directory's files) now
    cp.local_dir                 # files left here are uploaded by the executor on SIGTERM and timeout

A previous attempt that saved nothing is not an error: read() returns None, restore() returns None.
"""
from __future__ import annotations

import os
import tempfile

from executor import storage

DEST_ENV = "EXECUTOR_CHECKPOINT_PATH"
PREV_ENV = "EXECUTOR_PREV_CHECKPOINT"
LOCAL_ENV = "EXECUTOR_CHECKPOINT_LOCAL_DIR"
BYTES_NAME = "_dst_cp"  # flytekit's SyncCheckpoint.TMP_DST_PATH


class Checkpoint:
    def __init__(self, dest: str | None, prev: str | None, local_dir: str | None = None):
        self.dest = dest
        self.prev = prev or None
        self.local_dir = local_dir
        self._restored: str | None = None

    def prev_exists(self) -> bool:
        return self.prev is not None

    def restore(self, path: str | None = None) -> str | None:
        """Download the previous checkpoint into a directory (once) and return it; None if there is none."""
        if self.prev is None:
            return None
        if self._restored:
            return self._restored
        target = path or tempfile.mkdtemp(prefix="executor-prev-checkpoint-")
        try:
            storage.download_dir(self.prev, target)
        except storage.StorageNotFound:
            return None  # the previous attempt saved nothing
        self._restored = target
        return target

    def read(self) -> bytes | None:
        restored = self.restore()
        if restored is None:
            return None
        files = os.listdir(restored)
        if not files:
            return None
        if len(files) > 1:
            raise ValueError(f"expected exactly one checkpoint file, found {sorted(files)}")
        with open(os.path.join(restored, files[0]), "rb") as f:
            return f.read()

    def write(self, data: bytes) -> None:
        storage.write_bytes(storage.join(self._dest(), BYTES_NAME), data)

    def save(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        if os.path.isdir(path):
            storage.upload_dir(path, self._dest())
        else:
            storage.upload_file(path, storage.join(self._dest(), os.path.basename(path)))

    def _dest(self) -> str:
        if not self.dest:
            raise RuntimeError("this invocation has no --checkpoint-path: nothing to save checkpoints to")
        return self.dest


def current() -> Checkpoint:
    return Checkpoint(os.environ.get(DEST_ENV), os.environ.get(PREV_ENV), os.environ.get(LOCAL_ENV))


def upload_local_dir(dest: str | None, local_dir: str | None) -> bool:
    """Upload what the task left in its local checkpoint dir (on SIGTERM / timeout). True if anything was."""
    if not dest or not local_dir or not os.path.isdir(local_dir) or not os.listdir(local_dir):
        return False
    storage.upload_dir(local_dir, dest)
    return True

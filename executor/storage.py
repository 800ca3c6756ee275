"""Object storage access: plain paths and file:// natively, everything else through fsspec.

Public surface (the rest of the executor uses only these):
    read_bytes(uri) -> bytes
    write_bytes(uri, data)          atomic: a reader sees the old object, or none, or all of data
    exists(uri) -> bool
    join(prefix, *parts) -> str
    download_file(uri, local_path)
    upload_file(local_path, uri)    atomic at the destination
    StorageError(uri, message, transient) / StorageNotFound

Local paths never import fsspec: the cold start is a product feature.
"""
from __future__ import annotations

import os


class StorageError(Exception):
    """A read or write that failed; `transient` says whether retrying could help."""

    def __init__(self, uri: str, message: str, transient: bool = False):
        super().__init__(f"{message}: {uri}")
        self.uri = uri
        self.transient = transient


class StorageNotFound(StorageError):
    def __init__(self, uri: str):
        super().__init__(uri, "no such object", transient=False)


def _local_path(uri: str) -> str | None:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" not in uri:
        return uri
    return None


def join(prefix: str, *parts: str) -> str:
    out = prefix.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def read_bytes(uri: str) -> bytes:
    path = _local_path(uri)
    if path is None:
        raise StorageError(uri, "protocol not supported yet")
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StorageNotFound(uri) from None
    except OSError as e:
        raise StorageError(uri, f"cannot read ({e.strerror})") from e


def write_bytes(uri: str, data: bytes) -> None:
    path = _local_path(uri)
    if path is None:
        raise StorageError(uri, "protocol not supported yet")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StorageError(uri, f"cannot write ({e.strerror})") from e


def exists(uri: str) -> bool:
    path = _local_path(uri)
    if path is None:
        raise StorageError(uri, "protocol not supported yet")
    return os.path.exists(path)


def download_file(uri: str, local_path: str) -> None:
    data = read_bytes(uri)
    with open(local_path, "wb") as f:
        f.write(data)


def upload_file(local_path: str, uri: str) -> None:
    with open(local_path, "rb") as f:
        write_bytes(uri, f.read())

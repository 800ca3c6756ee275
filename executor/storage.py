"""Object storage access: plain paths and file:// natively, s3:// through obstore (or s3fs),
everything else through fsspec.

Public surface (the rest of the executor uses only these):
    read_bytes(uri) -> bytes
    write_bytes(uri, data)          atomic: a reader sees the old object, or none, or all of data
    exists(uri) -> bool
    join(prefix, *parts) -> str
    download_file(uri, local_path)  atomic at the local destination
    upload_file(local_path, uri)    atomic at the destination
    download_dir(uri, local_dir)    every object under the prefix, recursively
    upload_dir(local_dir, uri)      every file under the directory, recursively
    StorageError(uri, message, transient) / StorageNotFound

Local paths never import fsspec: the cold start is a product feature. s3:// imports obstore
(≈ 5 ms; executor/obstore_s3.py says when s3fs is used instead), other remote protocols import
fsspec and the protocol's package (s3fs ≈ 300 ms, gcsfs ≈ 550 ms) on first use, and tenacity
only once a request has failed transiently. User-facing documentation: docs/storage.md.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable  # not typing/dataclasses: they cost ~10 ms at start-up


class StorageError(Exception):
    """A read or write that failed; `transient` says whether retrying could help."""

    explains_itself = True  # its message says it all: an error document shows no traceback for it

    def __init__(self, uri: str, message: str, transient: bool = False):
        super().__init__(f"{uri}: {message}")
        self.uri = uri
        self.message = message
        self.transient = transient

    def __reduce__(self):  # picklable: it may come back from a forked attempt
        return StorageError, (self.uri, self.message, self.transient)


class StorageNotFound(StorageError):
    def __init__(self, uri: str):
        super().__init__(
            uri,
            "no such object (check the URI, and that the step that should have written it succeeded)",
            transient=False,
        )

    def __reduce__(self):
        return StorageNotFound, (self.uri,)


def join(prefix: str, *parts: str) -> str:
    out = prefix.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _local_path(uri: str) -> str | None:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" not in uri:
        return uri
    return None


# ---------------------------------------------------------------------------------------------
# Public API: each call dispatches to the local (os only) or the remote (fsspec) implementation.


def local_file(uri: str) -> str | None:
    """The path of a local uri, checked to be a readable file; None for a remote uri.

    Raises StorageNotFound or StorageError as reading it would.
    """
    path = _local_path(uri)
    if path is not None:
        _open_local(uri, path).close()
    return path


def read_bytes(uri: str) -> bytes:
    path = _local_path(uri)
    if path is None:
        # s3fs would first HEAD the object (and LIST on a miss) to decide on parallel ranged GETs;
        # what we read this way is small, so one GET it is. gcsfs does one GET by default.
        one_request = {"max_concurrency": 1} if uri.startswith(("s3://", "s3a://")) else {}
        return _remote(uri, "read", "cat_file", **one_request)
    with _open_local(uri, path) as f:
        try:
            return f.read()
        except OSError as e:
            raise StorageError(uri, f"cannot read ({e.strerror}); check the path and its permissions") from e


def write_bytes(uri: str, data: bytes, durable: bool = True) -> None:
    """Atomic: readers see the whole object or none. durable=False: a local file is not fsync'd."""
    path = _local_path(uri)
    if path is None:
        # One PUT (s3fs below 100 MiB) or one simple upload (gcsfs below 50 MiB): the store never
        # exposes a partial object. Bigger payloads go multipart/resumable, which only become
        # visible when the final request commits, so they are atomic as well.
        _remote(uri, "write", "pipe_file", data)
        return

    _atomic_local_write(uri, path, lambda f: f.write(data), durable=durable)


def exists(uri: str) -> bool:
    path = _local_path(uri)
    if path is not None:
        return os.path.exists(path)
    try:
        # Not fs.exists(): fsspec's default swallows every error (a 503 would read as "absent").
        _remote(uri, "check", "info")
        return True
    except StorageNotFound:
        return False


def download_file(uri: str, local_path: str) -> None:
    src = _local_path(uri)
    if src is not None:
        _copy_local(uri, src, local_path, local_path)
        return
    tmp = None
    try:
        tmp = _temp_path(local_path)  # same directory, so the final rename is atomic
        _remote(uri, "download", "get_file", tmp)
        os.replace(tmp, local_path)
        tmp = None
    except OSError as e:
        raise StorageError(uri, f"cannot save to {local_path} ({e.strerror}); check that it is writable") from e
    finally:
        if tmp is not None:
            _remove_quietly(tmp)


def upload_file(local_path: str, uri: str) -> None:
    if not os.path.isfile(local_path):
        raise StorageError(uri, f"cannot upload {local_path}: no such local file")
    dst = _local_path(uri)
    if dst is not None:
        _copy_local(local_path, local_path, uri, dst)
        return
    # One PUT below 100 MiB (s3fs) / one simple upload below 5 MiB (gcsfs); multipart or
    # resumable above, which also make the object appear only once it is complete.
    _remote(uri, "upload", "put_file", local_path, path_last=True)


def download_hashed(uri: str, local_path: str, durable: bool = True, progress=None) -> tuple[str, str | None]:
    """Download uri to local_path atomically, in one pass over the bytes.

    Returns (md5 hex of the bytes, the md5 the store itself keeps or None). Objects of at least
    EXECUTOR_PARALLEL_DOWNLOAD_BYTES (default 64 MiB) are fetched as parallel ranged GETs, hashed
    in order as the parts arrive. `progress` (a bundle.growing.GrowingFile), if given, is told
    where each attempt writes (begin) and how far its bytes are complete (grow), so that another
    thread can read the archive as it arrives; not for a local source (read where it lies).
    """
    from executor.md5 import md5

    src = _local_path(uri)
    if src is not None:
        result: list[str] = []

        def copy_local(out) -> None:
            with _open_local(uri, src) as f:
                hasher = md5(os.fstat(f.fileno()).st_size)
                while chunk := f.read(1 << 20):
                    hasher.update(chunk)
                    out.write(chunk)
            result.append(hasher.hexdigest())

        _atomic_local_write(uri, local_path, copy_local, durable=durable)
        return result[0], None

    threshold = int(os.environ.get("EXECUTOR_PARALLEL_DOWNLOAD_BYTES", 64 << 20))
    part = int(os.environ.get("EXECUTOR_DOWNLOAD_PART_BYTES", 0)) or None  # None: the client's default

    fs = _filesystem(uri)
    path = fs._strip_protocol(uri)

    def attempt(timeout: float) -> tuple[str, str | None]:
        # Not _atomic_local_write: a network error mid-stream must reach the retry policy as itself.
        # obstore answers size and ETag with the body of one GET; s3fs and gcsfs need a HEAD first.
        # Their every call is bounded by what is left of this attempt (gcsfs retries 429/5xx itself,
        # with backoff up to 16 s: unbounded, one call would outlast the whole deadline).
        ends = time.monotonic() + timeout
        left = lambda: max(0.001, ends - time.monotonic())  # noqa: E731
        reader, info = fs.open_with_info(path) if hasattr(fs, "open_with_info") else (None, _object_info(fs, path, timeout))
        size = int(info.get("size") or 0)
        hasher = md5(size, threaded=size >= threshold)  # parallel ranges: other threads fetch while it hashes
        tmp, fd = _create_temp(local_path)
        try:
            with os.fdopen(fd, "w+b") as out:  # w+: streamed ranges are hashed back from the file
                grow = None
                if progress is not None:
                    progress.begin(tmp, size, local_path)
                    grow = progress.grow
                if size >= threshold:
                    if reader is not None:
                        reader.close()  # big: fetched again as parallel ranges
                    _ranged_copy(fs, path, size, part, out, hasher, grow, left)
                elif reader is None:  # s3fs, gcsfs: 8 MiB GETs in turn (what their file objects would fetch)
                    _buffered_ranges(fs, path, size, 8 << 20, out, hasher, grow, left, workers=1)
                else:
                    with reader:
                        while chunk := reader.read(1 << 20):
                            hasher.update(chunk)
                            out.write(chunk)
                            if grow is not None:
                                out.flush()
                                grow(out.tell())
                if out.tell() != size:
                    raise _Truncated(f"got {out.tell()} of {size} bytes")
                out.flush()
                if durable:
                    os.fsync(out.fileno())
            os.replace(tmp, local_path)
            tmp = None
            digest, stored = hasher.hexdigest(), md5_from_info(info)
            if stored not in (None, digest) and hasattr(fs, "encryption"):
                # obstore's GET does not say how the object is encrypted: asked only when it matters.
                stored = md5_from_info({**info, **fs.encryption(path, timeout)})
            return digest, stored
        finally:
            if tmp is not None:
                _remove_quietly(tmp)

    placed = _placed(fs, attempt)
    if progress is None:
        return _with_retries(uri, "download", placed)

    def followed(timeout: float) -> tuple[str, str | None]:
        try:
            return placed(timeout)
        except BaseException:
            # Told here, in this process, before any retry: the reader stops following now, so a
            # retry's fork never meets extraction threads still at work on this attempt's bytes.
            progress.end()
            raise

    return _with_retries(uri, "download", followed)


class _Truncated(ConnectionError):
    """A body shorter than the object: transient (the connection dropped)."""


_WORKERS = 4  # ranged GETs at a time


def _ranged_copy(fs, path: str, size: int, part: int | None, out, hasher, grow=None, left=None) -> None:
    """grow(n), if given, is told each time the first n bytes of the file are complete; left(), the
    seconds left to the attempt, bounds each of an fsspec filesystem's calls."""
    if hasattr(fs, "open_range"):
        _streamed_ranges(fs, path, size, part or -(-size // _WORKERS), out, hasher, grow)
    else:
        _buffered_ranges(fs, path, size, part or 16 << 20, out, hasher, grow, left)


def _spans(size: int, part: int) -> list[tuple[int, int]]:
    return [(start, min(start + part, size)) for start in range(0, size, part)]


def _streamed_ranges(fs, path: str, size: int, part: int, out, hasher, grow=None, workers: int = _WORKERS) -> None:
    """Each range streamed straight into its place in the file as it arrives (memory: a chunk per
    worker, so a range can be large: by default one per worker, one GET each), while this thread
    hashes the file's growing prefix in order, read back from the page cache."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    spans = _spans(size, part)
    written = [start for start, _ in spans]  # per range: the offset written up to
    ended = [False] * len(spans)  # per range: its worker is done with it (or gave up)
    changed = threading.Condition()
    failed = threading.Event()
    fd = out.fileno()

    def fetch(i: int) -> None:
        start, end = spans[i]
        at = start
        try:
            if failed.is_set():
                return
            with fs.open_range(path, start, end) as reader:
                while not failed.is_set() and (chunk := reader.read()):
                    view = memoryview(chunk)
                    while view:
                        n = os.pwrite(fd, view, at)
                        view, at = view[n:], at + n
                    with changed:
                        written[i] = at
                        changed.notify_all()
            if at != end and not failed.is_set():
                raise _Truncated(f"range {start}-{end} returned {at - start} bytes")
        except BaseException:
            failed.set()
            raise
        finally:
            with changed:
                ended[i] = True
                changed.notify_all()

    with ThreadPoolExecutor(workers, thread_name_prefix="executor-download") as pool:
        try:
            futures = [pool.submit(fetch, i) for i in range(len(spans))]
            hashed = 0
            for i, (_, end) in enumerate(spans):
                while hashed < end:
                    with changed:
                        while written[i] <= hashed and not ended[i]:
                            changed.wait()
                        ready = written[i]
                    if ready <= hashed:  # ended short: the first error of any range says why
                        failed.set()
                        for future in futures:
                            if future.exception() is not None:
                                raise future.exception()
                        raise _Truncated(f"range {spans[i][0]}-{end} stopped at {ready}")
                    while hashed < ready:
                        data = os.pread(fd, min(ready - hashed, 1 << 20), hashed)
                        hasher.update(data)
                        hashed += len(data)
                        if grow is not None:
                            grow(hashed)
        except BaseException:
            failed.set()
            raise
    out.seek(size)  # written through the fd: the caller checks the file object's size


def _buffered_ranges(fs, path: str, size: int, part: int, out, hasher, grow=None, left=None,
                     workers: int = _WORKERS) -> None:
    """Ranges fetched whole into memory (fsspec's cat_file), a bounded window of them, written and
    hashed in order."""
    left = left or (lambda: None)
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    ranges = iter(_spans(size, part))
    with ThreadPoolExecutor(workers, thread_name_prefix="executor-download") as pool:
        window: deque = deque()

        def submit() -> None:
            span = next(ranges, None)
            if span is not None:
                window.append((span, pool.submit(
                    lambda: _call(fs, "cat_file", (path,), {"start": span[0], "end": span[1]}, left()))))

        for _ in range(workers * 2):  # a bounded window: at most 2 parts per worker in memory
            submit()
        while window:
            (start, end), future = window.popleft()
            data = future.result()
            if len(data) != end - start:
                raise _Truncated(f"range {start}-{end} returned {len(data)} bytes")
            hasher.update(data)
            out.write(data)
            if grow is not None:
                out.flush()
                grow(out.tell())
            submit()


def _object_info(fs, path: str, timeout: float) -> dict:
    """fs.info(path); from s3fs, with the encryption headers its info() leaves out (one HEAD either way)."""
    if not hasattr(fs, "call_s3"):
        return _call(fs, "info", (path,), {}, timeout)
    bucket, key, _ = fs.split_path(path)
    head = _call(fs, "call_s3", ("head_object", fs.kwargs), {"Bucket": bucket, "Key": key}, timeout)
    return {"size": head["ContentLength"], "ETag": head.get("ETag", ""),
            "ServerSideEncryption": head.get("ServerSideEncryption"),
            "SSECustomerAlgorithm": head.get("SSECustomerAlgorithm")}


def md5_from_info(info: dict) -> str | None:
    """The md5 a store keeps for an object: S3 ETag of a single-part put, or GCS md5Hash."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    # AWS's ETag is the md5 only for an object stored in the clear or under SSE-S3 (AES256); under
    # SSE-KMS (aws:kms, aws:kms:dsse) or SSE-C it is some other 32 hex digits.
    in_the_clear = (info.get("ServerSideEncryption") or "AES256") == "AES256" and not info.get("SSECustomerAlgorithm")
    if len(etag) == 32 and "-" not in etag and in_the_clear:
        return etag.lower()
    md5_b64 = info.get("md5Hash")
    if md5_b64:
        import base64

        return base64.b64decode(md5_b64).hex()
    return None


def upload_dir(local_dir: str, uri: str) -> None:
    """Upload every file under local_dir to uri/<relative path>, one atomic upload per file."""
    if not os.path.isdir(local_dir):
        raise StorageError(uri, f"cannot upload {local_dir}: no such local directory")
    for root, _dirs, files in os.walk(local_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            upload_file(path, join(uri, os.path.relpath(path, local_dir).replace(os.sep, "/")))


def download_dir(uri: str, local_dir: str) -> None:
    """Download every object under the prefix uri into local_dir, keeping relative paths.

    Raises StorageNotFound when nothing is stored under the prefix.
    """
    for rel in _list_files(uri):
        target = os.path.abspath(os.path.join(local_dir, rel))
        # An object key with ".." must not write outside local_dir.
        if not target.startswith(os.path.abspath(local_dir) + os.sep):
            raise StorageError(join(uri, rel), f"refusing to download outside {local_dir}")
        download_file(join(uri, rel), target)


def _list_files(uri: str) -> list[str]:
    """Paths of all files under uri, relative to it, with '/' separators."""
    path = _local_path(uri)
    if path is not None:
        if not os.path.isdir(path):
            raise StorageNotFound(uri)
        return [
            os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/")
            for root, _dirs, files in os.walk(path)
            for name in files
        ]
    fs = _filesystem(uri)
    root = fs._strip_protocol(uri).rstrip("/")
    found = _remote(uri, "list", "find")
    rels = [p[len(root) + 1:] for p in found if p.startswith(root + "/") and not p.endswith("/")]
    if not rels:
        raise StorageNotFound(uri)
    return sorted(rels)


# ---------------------------------------------------------------------------------------------
# Local files: write to a temp file in the target's directory, fsync, then os.replace. Readers
# see the old file or the complete new one; a failure leaves neither a partial file nor a temp.


def _temp_path(path: str, make_dirs: bool = True) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    if make_dirs:
        os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def _create_temp(path: str) -> tuple[str, int]:
    """A fresh temp file beside `path` (its directories made if missing): (its path, an fd open for
    reading and writing)."""
    tmp = _temp_path(path, make_dirs=False)  # the directory usually exists: no makedirs per write
    # O_EXCL: never clobber another writer's temp; mode 0o666 lets the umask decide.
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    try:
        return tmp, os.open(tmp, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        return tmp, os.open(tmp, flags, 0o666)


def _atomic_local_write(uri: str, path: str, write: Callable, durable: bool = True) -> None:
    tmp = None
    try:
        tmp, fd = _create_temp(path)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if durable:
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise StorageError(uri, f"cannot write ({e.strerror}); check free space and permissions") from e
    finally:
        if tmp is not None:
            _remove_quietly(tmp)


def _copy_local(src_uri: str, src: str, dst_uri: str, dst: str) -> None:
    import shutil  # only local copies need it

    with _open_local(src_uri, src) as f:
        _atomic_local_write(dst_uri, dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def _open_local(uri: str, path: str):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise StorageNotFound(uri) from None
    except OSError as e:
        raise StorageError(uri, f"cannot read ({e.strerror}); check the path and its permissions") from e


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; some filesystems cannot fsync a directory, which is fine.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Remote filesystems: one fsspec instance per (protocol, settings) per process, built from env
# the way flytekit builds it, so a pod configured for flytekit works unchanged.

_MISSING_PACKAGE_HINT = {
    "s3": "pip install 'executor[s3]'",
    "s3a": "pip install 'executor[s3]'",
    "gs": "pip install 'executor[gcs]'",
    "gcs": "pip install 'executor[gcs]'",
    "abfs": "pip install adlfs",
    "abfss": "pip install adlfs",
    "az": "pip install adlfs",
}

# Clients by what made them: the protocol, our options, and the environment the client library reads
# credentials from by itself. Each value is (that environment's fingerprint, the client).
_filesystems: dict = {}
# What a client library may read from the environment on its own (AWS_PROFILE, AWS_ACCESS_KEY_ID,
# GOOGLE_APPLICATION_CREDENTIALS, ~/.aws through HOME, ...), and the FLYTE_* variables our options use.
_CREDENTIAL_ENV = ("AWS_", "FLYTE_AWS_", "GOOGLE_", "GCE_", "CLOUDSDK_", "FLYTE_GCP", "AZURE_", "FLYTE_AZURE_",
                   "EXECUTOR_GCS_", "STORAGE_EMULATOR_HOST", "HOME")


def _fingerprint(text: str) -> str:
    from executor.md5 import md5  # not hashlib: loading OpenSSL costs a pod's cold start 3-5 ms

    digest = md5(len(text))
    digest.update(text.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _credentials_fingerprint() -> str:
    env = os.environ
    return _fingerprint("\0".join(f"{name}={env[name]}" for name in sorted(env) if name.startswith(_CREDENTIAL_ENV)))


def forget_other_credentials() -> None:
    """Drop the clients made under other credentials than this environment's. A warm runner calls it
    as each invocation starts: a client holds the credentials it was made with, and the next
    invocation must neither act with the previous one's nor be able to reach them."""
    if _filesystems:
        current = _credentials_fingerprint()
        for key in [key for key, (made_under, _) in _filesystems.items() if made_under != current]:
            del _filesystems[key]


def _drop_inherited_clients() -> None:
    """In a forked child: none of the parent's clients (its event loop thread and connections did not
    survive the fork, and a warm pool's were made for other invocations). They are dropped without
    being closed: closing one waits on that dead event loop (s3fs's finalizer blocks ~1 s)."""
    if not _filesystems:
        return
    import weakref

    inherited = {id(fs) for _, fs in _filesystems.values()}  # still referenced: none is freed (and finalized) yet
    for finalizer in list(weakref.finalize._registry):  # noqa: SLF001 - the only way to reach them
        referent = finalizer.peek()
        if referent is not None and id(referent[0]) in inherited:
            finalizer.detach()
    _filesystems.clear()


os.register_at_fork(after_in_child=_drop_inherited_clients)


def _s3_options() -> dict:
    env = os.environ
    config: dict = {
        # Ours is the only retry loop (see _remote): botocore makes a single attempt, so the
        # deadline and attempt count in EXECUTOR_STORAGE_RETRY_* are what actually happens.
        "retries": {"mode": "standard", "total_max_attempts": 1},
    }
    options: dict = {"use_listings_cache": False, "config_kwargs": config}
    if env.get("FLYTE_AWS_ENDPOINT"):
        options["client_kwargs"] = {"endpoint_url": env["FLYTE_AWS_ENDPOINT"]}
    if env.get("FLYTE_AWS_ACCESS_KEY_ID"):
        options["key"] = env["FLYTE_AWS_ACCESS_KEY_ID"]
    if env.get("FLYTE_AWS_SECRET_ACCESS_KEY"):
        options["secret"] = env["FLYTE_AWS_SECRET_ACCESS_KEY"]
    if env.get("FLYTE_AWS_ADDRESSING_STYLE"):
        config["s3"] = {"addressing_style": env["FLYTE_AWS_ADDRESSING_STYLE"]}
    return options


def _gcs_options() -> dict:
    # gcsfs >= 2025 first tries a gRPC client for zonal/HNS buckets and can stall ~60 s doing so;
    # the flag is read when gcsfs is imported, so it must be set before that.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    options: dict = {"use_listings_cache": False}
    # Without these gcsfs uses STORAGE_EMULATOR_HOST and the usual Google credential chain.
    if os.environ.get("EXECUTOR_GCS_ENDPOINT"):
        options["endpoint_url"] = os.environ["EXECUTOR_GCS_ENDPOINT"]
    if os.environ.get("EXECUTOR_GCS_TOKEN"):
        options["token"] = os.environ["EXECUTOR_GCS_TOKEN"]
    return options


def _azure_options() -> dict:
    # Same mapping as flytekit's azure_setup_args.
    names = {
        "account_name": "FLYTE_AZURE_STORAGE_ACCOUNT_NAME",
        "account_key": "FLYTE_AZURE_STORAGE_ACCOUNT_KEY",
        "tenant_id": "FLYTE_AZURE_TENANT_ID",
        "client_id": "FLYTE_AZURE_CLIENT_ID",
        "client_secret": "FLYTE_AZURE_CLIENT_SECRET",
    }
    return {arg: os.environ[var] for arg, var in names.items() if os.environ.get(var)}


def _options(protocol: str) -> dict:
    if protocol in ("s3", "s3a"):
        return _s3_options()
    if protocol in ("gs", "gcs"):
        return _gcs_options()
    if protocol in ("abfs", "abfss", "az"):
        return _azure_options()
    return {}


# The implementations our options and error handling are written for. fsspec's registry is not
# used for these: flyte 2 re-registers s3/gs/abfs with its own obstore filesystems when imported.
_IMPLEMENTATIONS = {
    "s3": ("s3fs", "S3FileSystem"), "s3a": ("s3fs", "S3FileSystem"),
    "gs": ("gcsfs", "GCSFileSystem"), "gcs": ("gcsfs", "GCSFileSystem"),
}


def _filesystem_class(protocol: str):
    if protocol in _IMPLEMENTATIONS:
        import importlib

        module, name = _IMPLEMENTATIONS[protocol]
        return getattr(importlib.import_module(module), name)
    import fsspec

    return fsspec.get_filesystem_class(protocol)


def _filesystem(uri: str):
    protocol = uri.split("://", 1)[0]
    filesystem_class, options = _implementation(uri, protocol)
    credentials = _credentials_fingerprint()
    # Hashed: the options may hold a secret key, which this dict's keys must not keep in the clear.
    key = _fingerprint(f"{protocol}\0{sorted(options.items())!r}\0{credentials}")
    _, fs = _filesystems.get(key, (None, None))
    if fs is None:
        try:
            fs = filesystem_class()(**options)
        except ImportError as e:
            hint = _MISSING_PACKAGE_HINT.get(protocol, f"install the fsspec package for '{protocol}://'")
            raise StorageError(uri, f"support for {protocol}:// is not installed ({e}); {hint}") from e
        except ValueError as e:
            raise StorageError(uri, f"unsupported URI scheme '{protocol}://' ({e})") from e
        if protocol in ("s3", "s3a"):
            fs.retries = 1  # s3fs's own retry loop; ours is the only one (see _s3_options)
        _filesystems[key] = (credentials, fs)
    return fs


def _implementation(uri: str, protocol: str) -> tuple[Callable, dict]:
    """(a function giving the filesystem class, its options): s3:// may be obstore's."""
    if protocol in ("s3", "s3a"):
        from executor import obstore_s3

        try:
            use_obstore = obstore_s3.client() == obstore_s3.OBSTORE
        except ValueError as e:
            raise StorageError(uri, str(e)) from e
        if use_obstore:
            deadline = _RetrySettings.from_env(uri).deadline
            return (lambda: obstore_s3.ObstoreS3), obstore_s3.settings(request_timeout=deadline)
    # fsspec keeps every instance in a class-level cache of its own, which would keep each
    # invocation's credentials for good: ours (above) is the only one.
    return (lambda: _filesystem_class(protocol)), {**_options(protocol), "skip_instance_cache": True}


def _call(fs, method: str, args: tuple, kwargs: dict, timeout: float):
    if getattr(fs, "async_impl", False):
        from fsspec.asyn import sync

        # Bounds one attempt by what is left of the deadline; gcsfs retries 5xx/429 internally
        # (up to 6 tries, no switch to turn that off), and this keeps those within our deadline.
        return sync(fs.loop, getattr(fs, "_" + method), *args, timeout=timeout, **kwargs)
    return getattr(fs, method)(*args, **kwargs)


def _remote(uri: str, action: str, method: str, *args, path_last: bool = False, **kwargs):
    """fs.<method>(path, *args, **kwargs) (or (*args, path)) under the retry policy."""
    fs = _filesystem(uri)
    path = fs._strip_protocol(uri)
    call_args = (*args, path) if path_last else (path, *args)
    return _with_retries(uri, action, _placed(fs, lambda timeout: _call(fs, method, call_args, kwargs, timeout)))


def _placed(fs, attempt: Callable[[float], object]) -> Callable[[float], object]:
    """The attempt, run where the filesystem says (obstore: maybe in a forked process)."""
    run_attempt = getattr(fs, "run_attempt", None)
    if run_attempt is None:
        return attempt
    return lambda timeout: run_attempt(attempt, timeout, in_child=_forking_pid == os.getpid())


_forking_pid: int | None = None  # a process that forks workers which use storage too


def forks_children() -> None:
    """Say that this process forks workers that use storage: keeps state that does not survive a
    fork (obstore's runtime) out of this process."""
    global _forking_pid
    _forking_pid = os.getpid()


# ---------------------------------------------------------------------------------------------
# Retries: exponential backoff with full jitter, bounded by attempts and a total deadline.


class _RetrySettings:
    def __init__(self, attempts: int = 5, deadline: float = 60.0, base_delay: float = 0.2):
        self.attempts = attempts
        self.deadline = deadline
        self.base_delay = base_delay
        self.max_delay = 20.0

    @classmethod
    def from_env(cls, uri: str) -> "_RetrySettings":
        def read(name: str, default, parse, minimum):
            raw = os.environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = parse(raw)
            except ValueError:
                value = None
            if value is None or value < minimum:
                raise StorageError(uri, f"{name}={raw!r} is invalid: it must be a number >= {minimum}")
            return value

        return cls(
            attempts=read("EXECUTOR_STORAGE_RETRY_ATTEMPTS", 5, int, 1),
            deadline=read("EXECUTOR_STORAGE_RETRY_DEADLINE", 60.0, float, 0.001),
            base_delay=read("EXECUTOR_STORAGE_RETRY_BASE_DELAY", 0.2, float, 0),
        )


def _with_retries(uri: str, action: str, attempt: Callable[[float], object]):
    settings = _RetrySettings.from_env(uri)
    started = time.monotonic()
    try:
        return attempt(settings.deadline)
    except Exception as e:
        first = _storage_error(uri, action, e)
        if not first.transient:
            raise first from e
    return _retry(uri, action, attempt, settings, started, first)


def _retry(uri, action, attempt, settings: _RetrySettings, started: float, first: StorageError):
    import tenacity  # only after a transient failure: the happy path never pays for it

    def remaining() -> float:
        return settings.deadline - (time.monotonic() - started)

    # Attempt 1 already failed outside tenacity; tenacity's first call re-raises that failure so
    # its backoff, stop and logging cover every retry uniformly.
    replay = [first]
    last = [first]
    made = [1]

    def try_once():
        if replay:
            raise replay.pop()
        if remaining() <= 0:
            raise last[0]  # out of time: the stop check ends the loop with the real error
        made[0] += 1
        try:
            return attempt(remaining())
        except Exception as e:
            last[0] = _storage_error(uri, action, e)
            raise last[0] from e

    jitter = tenacity.wait_random_exponential(multiplier=settings.base_delay, max=settings.max_delay)
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(settings.attempts) | (lambda state: remaining() <= 0),
        wait=lambda state: max(0.0, min(jitter(state), remaining())),
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, StorageError) and e.transient),
        before_sleep=lambda state: _log_retry(uri, state, settings),
        reraise=True,
    )
    try:
        return retrying(try_once)
    except StorageError as e:
        if not e.transient:
            raise
        elapsed = time.monotonic() - started
        raise StorageError(
            uri,
            f"gave up after {made[0]} attempt{'s' if made[0] > 1 else ''} in {elapsed:.1f} s; "
            f"last error: {e.message}. The store was unreachable or overloaded: retry later, or "
            f"raise EXECUTOR_STORAGE_RETRY_DEADLINE (now {settings.deadline:g} s) or "
            f"EXECUTOR_STORAGE_RETRY_ATTEMPTS (now {settings.attempts})",
            transient=True,
        ) from e


def _log_retry(uri: str, state, settings: _RetrySettings) -> None:
    error = state.outcome.exception()
    detail = error.message if isinstance(error, StorageError) else repr(error)
    delay = state.next_action.sleep if state.next_action else 0.0
    attempt = state.attempt_number + 1
    message = f"storage: {detail}; retrying in {delay:.2f} s (attempt {attempt} of {settings.attempts})"
    try:
        from executor import logs
    except ImportError:  # logs is a sibling module; stay useful without it
        print(f"{message}: {uri}", file=sys.stderr, flush=True)
    else:
        logs.warning(message, uri=uri, attempt=attempt, delay=round(delay, 3))


# ---------------------------------------------------------------------------------------------
# Error classification. Exceptions come from botocore, aiohttp, gcsfs, fsspec or the OS, wrapped
# in each other; we look along the cause chain by type *name* so nothing is imported to classify.

NOT_FOUND, DENIED, TRANSIENT, FAILED = "not found", "denied", "transient", "failed"

_TRANSIENT_TYPES = {
    # botocore
    "HTTPClientError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectTimeoutError", "IncompleteReadError", "ResponseStreamingError", "ResponseParserError",
    # aiohttp / http.client / requests
    "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError", "IncompleteRead",
    "ChunkedEncodingError", "ProxyError",
    # gcsfs: body did not match its md5/crc32c
    "ChecksumError",
    # builtins (ConnectionResetError, ConnectionRefusedError, ...), asyncio and fsspec timeouts
    "ConnectionError", "TimeoutError",
}
_DENIED_TYPES = {"PermissionError", "NoCredentialsError", "PartialCredentialsError"}
_S3_CODES = {
    "NoSuchKey": NOT_FOUND, "NoSuchBucket": NOT_FOUND, "NotFound": NOT_FOUND,
    "AccessDenied": DENIED, "InvalidAccessKeyId": DENIED, "SignatureDoesNotMatch": DENIED,
    "ExpiredToken": DENIED,
    "SlowDown": TRANSIENT, "Throttling": TRANSIENT, "ThrottlingException": TRANSIENT,
    "RequestTimeout": TRANSIENT, "InternalError": TRANSIENT, "ServiceUnavailable": TRANSIENT,
}


def _http_status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    for attr in ("status", "code"):  # aiohttp ClientResponseError, gcsfs HttpError
        status = getattr(e, attr, None)
        if isinstance(status, int) and 100 <= status <= 599:
            return status
    return None


def _classify_one(e: BaseException) -> str | None:
    if isinstance(e, FileNotFoundError):
        return NOT_FOUND
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code in _S3_CODES:
            return _S3_CODES[code]
    status = _http_status(e)
    if status is not None:
        if status == 404:
            return NOT_FOUND
        if status in (401, 403):
            return DENIED
        if status in (408, 429) or status >= 500:
            return TRANSIENT
        if status >= 400:
            return FAILED
    names = {cls.__name__ for cls in type(e).__mro__}
    if names & _DENIED_TYPES:
        return DENIED
    if names & _TRANSIENT_TYPES:
        return TRANSIENT
    return None


def _chain(e: BaseException):
    """e, then what caused it, and so on."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _classify(e: BaseException) -> str:
    """NOT_FOUND, DENIED, TRANSIENT or FAILED for an exception raised by a storage backend."""
    return next((kind for kind in map(_classify_one, _chain(e)) if kind), FAILED)


def _storage_error(uri: str, action: str, e: BaseException) -> StorageError:
    if isinstance(e, StorageError):
        return e
    kind = _classify(e)
    if kind == NOT_FOUND:
        return StorageNotFound(uri)
    status = next((s for s in map(_http_status, _chain(e)) if s), None)
    detail = f"{type(e).__name__}: {e}".strip().rstrip(":") + (f", HTTP {status}" if status else "")
    if type(e).__name__ == "FSTimeoutError":  # raised by _call's bound, with no message of its own
        detail = ("timed out: the store did not answer in time, or kept answering 429 or 5xx, which gcsfs "
                  "retries by itself (FSTimeoutError)")
    if len(detail) > 300:
        detail = detail[:300] + "…"
    if kind == DENIED:
        return StorageError(
            uri,
            f"{action} denied ({detail}); check the pod's credentials (FLYTE_AWS_* / AWS_* / the "
            "service account) and the bucket's permissions",
        )
    if kind == TRANSIENT:
        return StorageError(uri, f"{action} failed, possibly temporarily ({detail})", transient=True)
    return StorageError(
        uri, f"{action} failed ({detail}); check the URI and the storage settings (docs/storage.md)"
    )

"""Flyte 2's pickled-task bundles (`a0 --pkl URI`): gzip(cloudpickle(task)), verified before unpickling.

Unpickling runs code, so nothing is unpickled before every check that can be made has passed:
  * the md5 of the downloaded bytes equals `--version` when that is an md5 (`flyte run` sets it so)
    and the md5 the store keeps (S3 ETag of a single-part put, GCS md5Hash);
  * the file is at most EXECUTOR_PKL_MAX_BYTES (default 256 MiB) and inflates to at most
    EXECUTOR_PKL_MAX_INFLATED_BYTES (default 1 GiB), ratio capped like tar bundles.
EXECUTOR_BUNDLE_VERIFY applies as for tar bundles (strict: something must have been verified).
"""
from __future__ import annotations

import os
import tempfile

from executor import logs, storage
from executor.errors import TaskFailure


def _limit(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        raise TaskFailure("BUNDLE_INTEGRITY", f"{name}={os.environ[name]!r} is not a number of bytes") from None


def fetch_verified(uri: str, expected_md5: str | None, policy: str) -> bytes:
    """Download the pickle through executor.storage, verify it, return the inflated pickle bytes."""
    import gzip
    import zlib

    max_bytes = _limit("EXECUTOR_PKL_MAX_BYTES", 256 << 20)
    max_inflated = _limit("EXECUTOR_PKL_MAX_INFLATED_BYTES", 1 << 30)
    ratio = float(os.environ.get("EXECUTOR_BUNDLE_MAX_RATIO") or 200.0)
    fd, local = tempfile.mkstemp(prefix="executor-pkl-", suffix=".pkl.gz")
    os.close(fd)
    try:
        try:
            md5, stored = storage.download_hashed(uri, local)
        except storage.StorageNotFound:
            raise TaskFailure("BUNDLE_FETCH", f"pickled task {uri} does not exist", recoverable=False,
                              hint="was it uploaded by `flyte run`? check --pkl") from None
        except storage.StorageError as e:
            raise TaskFailure("BUNDLE_FETCH", f"cannot download the pickled task: {e}", cause=e) from None
        size = os.path.getsize(local)
        verified: list[str] = []
        if policy != "off":
            if expected_md5:
                if expected_md5 != md5:
                    raise TaskFailure("BUNDLE_INTEGRITY", f"pickled task {uri}: md5 is {md5}, --version says {expected_md5}",
                                      hint="the pickle changed since the task was launched; nothing from it was run")
                verified.append("--version md5")
            if stored:
                if stored != md5:
                    raise TaskFailure("BUNDLE_INTEGRITY", f"pickled task {uri}: downloaded bytes have md5 {md5}, the store says {stored}",
                                      hint="the download was corrupted or the object changed during the download")
                verified.append("store md5")
            if policy == "strict" and not verified:
                raise TaskFailure("BUNDLE_INTEGRITY", f"pickled task {uri}: nothing could be verified and the policy is strict",
                                  hint="launch with --version set to the pickle's md5, or set EXECUTOR_BUNDLE_VERIFY=auto")
        if size > max_bytes:
            raise TaskFailure("BUNDLE_UNSAFE", f"pickled task {uri} is {size} bytes, above EXECUTOR_PKL_MAX_BYTES={max_bytes}")
        cap = min(max_inflated, max(int(size * ratio), 1 << 20))
        try:
            with gzip.open(local, "rb") as f:
                data = f.read(cap + 1)
        except (OSError, EOFError, zlib.error) as e:
            raise TaskFailure("BUNDLE_INTEGRITY", f"pickled task {uri} is not a readable gzip file: {type(e).__name__}: {e}") from None
        if len(data) > cap:
            raise TaskFailure("BUNDLE_UNSAFE", f"pickled task {uri} inflates past {cap} bytes "
                              "(EXECUTOR_PKL_MAX_INFLATED_BYTES / EXECUTOR_BUNDLE_MAX_RATIO): a decompression bomb?")
        logs.info("pickled task fetched", uri=uri, bytes=size, verified=",".join(verified) or "nothing")
        return data
    finally:
        try:
            os.unlink(local)
        except OSError:
            pass


def load(uri: str, expected_md5: str | None, policy: str):
    data = fetch_verified(uri, expected_md5, policy)
    import cloudpickle

    try:
        return cloudpickle.loads(data)
    except ModuleNotFoundError as e:
        raise TaskFailure("IMPORT", f"the pickled task needs module {e.name!r}, which is not installed in the image",
                          cause=e, hint="a pickled task is loaded against the image's packages: install it there") from None
    except Exception as e:
        raise TaskFailure("IMPORT", f"cannot unpickle the task from {uri}: {type(e).__name__}: {e}", cause=e) from None

"""S3 through obstore (Rust's object_store): the light client for s3:// URIs.

s3fs pulls in aiobotocore, botocore and aiohttp, ≈ 400 ms of imports before the first request;
obstore imports in ≈ 5 ms and is what flyte 2 itself uses. `ObstoreS3` offers the handful of
fsspec methods executor.storage calls, so storage keeps one code path for every remote store.

Settings come from the same env a Flyte pod has (FLYTE_AWS_* first, then AWS_*), as in flyte 2's
own obstore configuration. obstore's credential chain covers static keys, IRSA web identity,
ECS/EKS container credentials and instance metadata; it does not read AWS profiles, so
`client()` picks s3fs (botocore) whenever a profile or a shared config/credentials file is in play.
User-facing documentation: docs/storage.md.
"""
from __future__ import annotations

import os

OBSTORE, S3FS = "obstore", "s3fs"


def client() -> str:
    """Which client serves s3:// here: EXECUTOR_S3_CLIENT, else obstore unless only botocore can
    find the credentials (an AWS profile or config file), else s3fs."""
    chosen = os.environ.get("EXECUTOR_S3_CLIENT", "").strip().lower()
    if chosen in (OBSTORE, S3FS):
        return chosen
    if chosen not in ("", "auto"):
        raise ValueError(f"EXECUTOR_S3_CLIENT={chosen!r} is invalid: use obstore, s3fs or auto")
    if _needs_botocore_credentials() or not _usable_here():
        return S3FS
    try:
        import obstore  # noqa: F401  (≈ 5 ms; tells us whether it is installed)
    except ImportError:
        return S3FS
    return OBSTORE


# obstore runs its requests on a tokio runtime whose threads do not survive fork(): a child of a
# process that has used obstore would hang on its first request. So a process that forks workers
# later (the supervisor, serve) calls `storage.forks_children()` first; its obstore attempts then
# run in a short-lived forked process of their own, leaving no runtime behind for its workers; and
# a process that did inherit a started runtime uses s3fs instead.
_runtime_pid: int | None = None  # the process whose obstore runtime has started


def _usable_here() -> bool:
    return _runtime_pid in (None, os.getpid())


def _needs_botocore_credentials() -> bool:
    env = os.environ
    if env.get("FLYTE_AWS_ACCESS_KEY_ID") or env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return False  # obstore reads these itself
    if env.get("AWS_PROFILE") or env.get("AWS_SHARED_CREDENTIALS_FILE") or env.get("AWS_CONFIG_FILE"):
        return True
    home = os.path.expanduser("~")
    return os.path.exists(os.path.join(home, ".aws", "credentials")) or os.path.exists(
        os.path.join(home, ".aws", "config")
    )


def settings(request_timeout: float) -> dict:
    """S3Store keyword arguments from the pod's env; obstore adds whatever else AWS_* says."""
    env = os.environ
    config: dict = {}
    endpoint = env.get("FLYTE_AWS_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        config["endpoint"] = endpoint
    if env.get("FLYTE_AWS_ACCESS_KEY_ID") and env.get("FLYTE_AWS_SECRET_ACCESS_KEY"):
        config["access_key_id"] = env["FLYTE_AWS_ACCESS_KEY_ID"]
        config["secret_access_key"] = env["FLYTE_AWS_SECRET_ACCESS_KEY"]
    elif env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        # Given here, not left to obstore: it reads the C-level environment, which in a warm
        # worker's own steps for an invocation (its template, its error document) is not that
        # invocation's (os.environ is).
        config["access_key_id"] = env["AWS_ACCESS_KEY_ID"]
        config["secret_access_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            config["session_token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        config["region"] = region
    # flytekit spells it FLYTE_AWS_ADDRESSING_STYLE, flyte 2 FLYTE_AWS_S3_ADDRESSING_STYLE.
    style = env.get("FLYTE_AWS_ADDRESSING_STYLE") or env.get("FLYTE_AWS_S3_ADDRESSING_STYLE")
    if style in ("virtual", "path"):
        config["virtual_hosted_style_request"] = style == "virtual"
    return {
        "config": config,
        # One request per attempt, each bounded: executor.storage's retry loop is the only one.
        "retry_config": {"max_retries": 0},
        "client_options": {
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
            "connect_timeout": f"{min(request_timeout, 10.0):.3f}s",
            "timeout": f"{request_timeout:.3f}s",
        },
    }


class ObstoreS3:
    """The subset of fsspec's S3FileSystem that executor.storage uses, over obstore."""

    async_impl = False

    def __init__(self, **store_settings):
        import obstore.store  # noqa: F401  (fail here, with storage's install hint, if it is missing)

        self._settings = store_settings
        self._stores: dict = {}

    @staticmethod
    def run_attempt(attempt, timeout: float, in_child: bool = False):
        """attempt(timeout), here or (in_child: this process forks workers later) in a forked one."""
        global _runtime_pid
        if in_child and _runtime_pid is None:  # not started here: keep it so
            from executor.forked_call import call_in_child

            return call_in_child(_leaf_attempt, attempt, timeout)
        _runtime_pid = os.getpid()
        return attempt(timeout)

    @staticmethod
    def _strip_protocol(uri: str) -> str:
        return uri.split("://", 1)[-1]

    def _store_and_key(self, path: str):
        bucket, _, key = path.partition("/")
        store = self._stores.get(bucket)
        if store is None:
            from obstore.store import S3Store

            store = self._stores[bucket] = S3Store(bucket, **self._settings)
        return store, key

    def info(self, path: str) -> dict:
        import obstore

        store, key = self._store_and_key(path)
        with _translated_errors():
            meta = obstore.head(store, key)
        return {"size": meta["size"], "ETag": meta.get("e_tag") or ""}

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **_ignored):
        """The object's bytes; with start/end, a ranged GET returning a buffer (no copy)."""
        import obstore

        store, key = self._store_and_key(path)
        with _translated_errors():
            if start is not None and end is not None:
                return obstore.get_range(store, key, start=start, end=end)
            return bytes(obstore.get(store, key).bytes())

    def pipe_file(self, path: str, data: bytes) -> None:
        import obstore

        store, key = self._store_and_key(path)
        with _translated_errors():
            obstore.put(store, key, data)

    def put_file(self, local_path: str, path: str) -> None:
        import obstore

        store, key = self._store_and_key(path)
        # A file above obstore's chunk size goes multipart; the object appears only once complete.
        with open(local_path, "rb") as f, _translated_errors():
            obstore.put(store, key, f)

    def get_file(self, path: str, local_path: str) -> None:
        with self.open(path) as reader, open(local_path, "wb") as out:
            while chunk := reader.read():
                out.write(chunk)

    def open(self, path: str, mode: str = "rb", block_size: int = 8 << 20) -> "_Reader":
        import obstore

        store, key = self._store_and_key(path)
        with _translated_errors():
            result = obstore.get(store, key)
        return _Reader(result.stream(min_chunk_size=block_size))

    def open_range(self, path: str, start: int, end: int) -> "_Reader":
        """A reader of bytes [start, end) as they arrive: one ranged GET, streamed."""
        import obstore

        store, key = self._store_and_key(path)
        with _translated_errors():
            result = obstore.get(store, key, options={"range": (start, end)})
        return _Reader(result.stream(min_chunk_size=1 << 20))

    def open_with_info(self, path: str) -> tuple["_Reader", dict]:
        """One GET: a reader of the body, and the size and ETag that came with it."""
        import obstore

        store, key = self._store_and_key(path)
        with _translated_errors():
            result = obstore.get(store, key)
        meta = result.meta
        return _Reader(result.stream(min_chunk_size=1 << 20)), {"size": meta["size"], "ETag": meta.get("e_tag") or ""}

    def encryption(self, path: str, timeout: float) -> dict:
        """The object's server-side encryption, named as in s3fs's head_object. obstore's head and
        get drop those headers, so this sends a HEAD of its own, presigned by obstore."""
        import urllib.request
        from datetime import timedelta

        import obstore

        store, key = self._store_and_key(path)
        try:
            url = obstore.sign(store, "HEAD", key, timedelta(minutes=5))
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
                headers = response.headers
        except Exception:  # e.g. SSE-C, whose HEAD needs the key: unknown, so the ETag is not taken for the md5
            return {"ServerSideEncryption": "unknown"}
        return {"ServerSideEncryption": headers.get("x-amz-server-side-encryption"),
                "SSECustomerAlgorithm": headers.get("x-amz-server-side-encryption-customer-algorithm")}

    def find(self, path: str) -> list[str]:
        import obstore

        store, key = self._store_and_key(path.rstrip("/"))
        bucket = path.split("/", 1)[0]
        with _translated_errors():
            return [f"{bucket}/{meta['path']}" for batch in obstore.list(store, key or None) for meta in batch]


def _leaf_attempt(attempt, timeout: float):
    global _runtime_pid
    _runtime_pid = os.getpid()
    return attempt(timeout)


class _Reader:
    """A file-like view of a streaming GET: read() hands out the chunks as they arrive."""

    def __init__(self, stream):
        self._stream = stream

    def read(self, _size: int = -1):
        with _translated_errors():
            return next(self._stream, b"")

    def close(self) -> None:
        self._stream = iter(())  # dropping obstore's stream ends the request

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


class ObjectStoreHTTPError(Exception):
    """A non-2xx answer from the store, shaped like botocore's ClientError (`response`) so that
    executor.storage classifies it by HTTP status and S3 error code like any S3 error."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        self._args = (status, code, message)

    def __reduce__(self):  # crosses the pipe from a forked attempt (see run_attempt)
        return type(self), self._args


class ObjectStoreConnectionError(ConnectionError):
    """The request or its body broke off, or timed out: transient."""


_NON_2XX = r"Error performing (\w+) .*? - Server returned non-2xx status code: (\d{3})([^:]*)"
_CONNECTION_TROUBLE = ("HTTP error", "error sending request", "timed out", "body error")


class _translated_errors:
    """obstore raises one GenericError for most things; name what happened so storage can
    classify it (not found / denied / transient / failed) like any other backend's error."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, _tb) -> bool:
        if exc is None or isinstance(exc, FileNotFoundError) or not _is_obstore_error(exc):
            return False
        import re  # only on the error path

        message = str(exc).split("\n\nDebug source:", 1)[0].strip()
        answer = re.search(_NON_2XX, message, re.S)
        if answer:
            method, status, reason = answer.group(1), int(answer.group(2)), answer.group(3).strip()
            code, detail = re.search("<Code>([^<]*)</Code>", message), re.search("<Message>([^<]*)</Message>", message)
            summary = f"{method} answered {status} {reason}".rstrip()
            if code:
                summary += f": {code.group(1)}" + (f" ({detail.group(1)})" if detail else "")
            raise ObjectStoreHTTPError(status, code.group(1) if code else "", summary) from exc
        message = message.removeprefix("Generic S3 error: ")
        if type(exc).__name__ in ("PermissionDeniedError", "UnauthenticatedError"):
            raise PermissionError(message) from exc
        if any(marker in message for marker in _CONNECTION_TROUBLE):
            raise ObjectStoreConnectionError(message) from exc
        return False


def _is_obstore_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("obstore") or any(
        cls.__module__.startswith("obstore") for cls in type(exc).__mro__
    )

"""Object stores on loopback, and a fault-injecting proxy to put in front of them.

Fixtures
    moto_s3        (session)  S3 server (moto). .endpoint .host .port .env .client
                              .make_bucket(name=None) .put(bucket, key, data) .get(bucket, key)
    s3_bucket      (function) a fresh bucket name; moto_s3.env applied to os.environ for the test
    gcs_emulator   (session)  GCS server (gcp-storage-emulator). Same attributes, no .client
    gcs_bucket     (function) a fresh bucket name; gcs_emulator.env applied to os.environ
    fault_proxy    (function) factory: fault_proxy(host, port) -> a started FaultProxy

`.env` is what a subprocess executor needs to reach the server; `.get` returns None for a
missing object. Servers and proxies listen on 127.0.0.1 only, run in daemon threads, and stop at
the end of their scope. Heavy imports (moto, boto3, the emulator) happen inside the fixtures so
that merely loading this plugin costs nothing.
"""
from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

SOCKET_TIMEOUT = 30.0  # no proxied exchange may hang a test for longer than this


def _fresh_name() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------
# S3 (moto)


@dataclass
class S3Server:
    host: str
    port: int
    client: Any  # boto3 S3 client talking straight to moto, for setup and assertions

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "FLYTE_AWS_ENDPOINT": self.endpoint,
            "FLYTE_AWS_ACCESS_KEY_ID": "testing",
            "FLYTE_AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def make_bucket(self, name: str | None = None) -> str:
        name = name or _fresh_name()
        self.client.create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def get(self, bucket: str, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None


@pytest.fixture(scope="session")
def moto_s3():
    import boto3
    from botocore.config import Config
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(connect_timeout=5, read_timeout=SOCKET_TIMEOUT, retries={"max_attempts": 1}),
    )
    try:
        yield S3Server(host, port, client)
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_s3, monkeypatch) -> str:
    for name, value in moto_s3.env.items():
        monkeypatch.setenv(name, value)
    return moto_s3.make_bucket()


# ---------------------------------------------------------------------------------------------
# GCS (gcp-storage-emulator)


@dataclass
class GcsServer:
    host: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "EXECUTOR_GCS_ENDPOINT": self.endpoint,
            "EXECUTOR_GCS_TOKEN": "anon",
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def _request(self, method: str, path: str, data: bytes | None = None, content_type: str = "") -> bytes:
        request = urllib.request.Request(f"{self.endpoint}{path}", data=data, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=SOCKET_TIMEOUT) as response:
            return response.read()

    def make_bucket(self, name: str | None = None) -> str:
        name = name or _fresh_name()
        body = json.dumps({"name": name}).encode()
        self._request("POST", "/storage/v1/b?project=test", body, "application/json")
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": key})
        self._request("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data, "application/octet-stream")

    def get(self, bucket: str, key: str) -> bytes | None:
        try:
            return self._request("GET", f"/download/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}?alt=media")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise


@pytest.fixture(scope="session")
def gcs_emulator():
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket="executor-test")
    server._api.daemon = True  # its thread is non-daemon by default and would block exit
    server.start()
    port = server._api._httpd.server_address[1]  # the emulator does not expose the bound port
    try:
        yield GcsServer("127.0.0.1", port)
    finally:
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch) -> str:
    for name, value in gcs_emulator.env.items():
        monkeypatch.setenv(name, value)
    return gcs_emulator.make_bucket()


# ---------------------------------------------------------------------------------------------
# Fault proxy: an HTTP proxy that serves one request per connection and can, per request, pass
# it through, answer with an error status, drop or reset the connection, delay, or cut the
# response body short.


@dataclass(frozen=True)
class Fault:
    kind: str  # pass | status | drop | reset | delay | truncate | corrupt | headers
    status: int = 0
    body: bytes = b""
    seconds: float = 0.0
    keep: float = 0.5  # truncate: fraction of the response body that gets through
    headers: tuple[tuple[str, str], ...] = ()  # headers: set on the response, replacing any of that name


def status(code: int, s3_code: str, message: str) -> Fault:
    """Answer with an HTTP error carrying an S3 XML error body (gcsfs just reads it as text)."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{s3_code}</Code><Message>{message}</Message>"
        "<RequestId>fault-proxy</RequestId></Error>"
    ).encode()
    return Fault("status", status=code, body=body)


PASS = Fault("pass")
SLOWDOWN = status(503, "SlowDown", "Please reduce your request rate.")
TOO_MANY_REQUESTS = status(429, "TooManyRequests", "Too many requests.")
FORBIDDEN = status(403, "AccessDenied", "Access Denied")
DROP = Fault("drop")  # read the request, close without answering
RESET = Fault("reset")  # read the request, answer with a TCP RST


def delay(seconds: float) -> Fault:
    return Fault("delay", seconds=seconds)


def truncate(keep: float = 0.5) -> Fault:
    return Fault("truncate", keep=keep)


CORRUPT = Fault("corrupt")  # the body arrives whole, with one byte in its middle flipped


def set_headers(**headers: str) -> Fault:
    """Pass the request, then answer with these headers set (underscores in names become dashes).
    The request goes without If-Match, which may quote a rewritten ETag back (s3fs does)."""
    return Fault("headers", headers=tuple((name.replace("_", "-"), value) for name, value in headers.items()))


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


class _Reader:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("peer closed")
        self.buf += chunk

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._fill()
        out, self.buf = self.buf.split(marker, 1)
        return out + marker

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def rest(self) -> bytes:
        while True:
            try:
                self._fill()
            except ConnectionError:
                out, self.buf = self.buf, b""
                return out


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if ":" in line]
    return lines[0], headers


def _build_head(first_line: str, headers: list[tuple[str, str]]) -> bytes:
    return ("\r\n".join([first_line, *(f"{k}: {v}" for k, v in headers)]) + "\r\n\r\n").encode("latin-1")


def _without(headers, *names: str) -> list[tuple[str, str]]:
    lowered = {n.lower() for n in names}
    return [(k, v) for k, v in headers if k.lower() not in lowered]


@dataclass
class FaultProxy:
    upstream_host: str
    upstream_port: int
    default: Fault = PASS
    rule: Callable[[Request], Fault | None] | None = None  # consulted before queue and default
    requests: list[Request] = field(default_factory=list)
    _queue: list[Fault] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)  # rules may read .count
    _stopped: threading.Event = field(default_factory=threading.Event)
    _listener: socket.socket | None = None
    _thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def enqueue(self, *faults: Fault) -> None:
        """Apply these to the next requests, in order; then `default` again."""
        with self._lock:
            self._queue.extend(faults)

    def start(self) -> "FaultProxy":
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)  # so the accept loop notices stop()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="fault-proxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._listener:
            self._listener.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _choose(self, request: Request) -> Fault:
        with self._lock:
            self.requests.append(request)
            chosen = self.rule(request) if self.rule else None
            if chosen is None and self._queue:
                chosen = self._queue.pop(0)
            return chosen or self.default

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(SOCKET_TIMEOUT)
        try:
            reader = _Reader(client)
            head = reader.until(b"\r\n\r\n")
            first_line, headers = _parse_head(head)
            lookup = {k.lower(): v for k, v in headers}
            if lookup.get("expect", "").lower() == "100-continue":
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = self._read_body(reader, lookup)
            method, path = first_line.split(" ")[:2]
            fault = self._choose(Request(method, path, lookup))
            self._apply(fault, client, first_line, headers, body)
        except OSError:
            pass  # the client went away or timed out; nothing to answer
        finally:
            client.close()

    @staticmethod
    def _read_body(reader: _Reader, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raw = b""
            while True:
                line = reader.until(b"\r\n")
                raw += line
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    trailer = reader.until(b"\r\n")
                    while trailer != b"\r\n":
                        raw += trailer
                        trailer = reader.until(b"\r\n")
                    return raw + trailer
                raw += reader.exact(size + 2)
        return reader.exact(int(headers.get("content-length", "0")))

    def _apply(self, fault: Fault, client, first_line, headers, body) -> None:
        if fault.kind == "drop":
            return
        if fault.kind == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return
        if fault.kind == "status":
            reply = [("Content-Type", "application/xml"), ("Content-Length", str(len(fault.body))),
                     ("Connection", "close")]
            client.sendall(_build_head(f"HTTP/1.1 {fault.status} Fault", reply) + fault.body)
            return
        if fault.kind == "delay" and self._stopped.wait(fault.seconds):
            return
        if fault.kind == "headers":
            headers = _without(headers, "if-match")
        response = self._forward(first_line, headers, body)
        status_line, response_headers = _parse_head(response.split(b"\r\n\r\n", 1)[0])
        if fault.kind == "headers":
            response_headers = _without(response_headers, *(k for k, _ in fault.headers)) + list(fault.headers)
        response_body = response.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in response else b""
        # One request per connection: tell the client so it does not reuse a closed socket.
        out_head = _build_head(status_line, _without(response_headers, "connection") + [("Connection", "close")])
        if fault.kind == "truncate":
            response_body = response_body[: int(len(response_body) * fault.keep)]
        if fault.kind == "corrupt" and response_body:
            middle = len(response_body) // 2
            response_body = response_body[:middle] + bytes([response_body[middle] ^ 0xFF]) + response_body[middle + 1:]
        client.sendall(out_head + response_body)

    def _forward(self, first_line, headers, body) -> bytes:
        upstream_headers = _without(headers, "connection", "expect") + [("Connection", "close")]
        with socket.create_connection((self.upstream_host, self.upstream_port), timeout=SOCKET_TIMEOUT) as up:
            up.sendall(_build_head(first_line, upstream_headers) + body)
            return _Reader(up).rest()


@pytest.fixture
def fault_proxy():
    proxies: list[FaultProxy] = []

    def make(host: str, port: int) -> FaultProxy:
        proxy = FaultProxy(host, port).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()

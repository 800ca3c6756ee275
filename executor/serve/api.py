"""The invocation API: HTTP (standard library http.server, HTTP/1.1 keep-alive) and JSON lines.

HTTP
    POST   /invocations[?wait=S]        {"id", "argv", "env", "isolation"?} -> 202 accepted (200 with
                                        the result if it finished within S seconds); an id already
                                        known: that invocation again (never run twice), or 409 if the
                                        body differs; 400 unusable; 429 busy; 503 draining
    GET    /invocations/{id}[?wait=S]   -> 200 state and result (with wait: once done or after S s)
    DELETE /invocations/{id}            -> 202 cancelling; 409 already finished; 404 unknown
    GET    /healthz                     -> 200 while the process serves
    GET    /readyz                      -> 200 while it accepts work, 503 once draining
    GET    /metrics                     -> Prometheus text format

JSON lines (--stdio): one request per line on stdin, one response or event per line on stdout:
    {"op": "invoke", "id", "argv", "env", "isolation"?}  -> {"event": "accepted"|"rejected", ...}
                                                          later {"event": "finished", ...record}
    {"op": "get", "id"} -> {"event": "status", ...}      {"op": "cancel", "id"} -> {"event": "cancel", ...}
    {"op": "metrics"} -> {"event": "metrics", "text"}    end of input: finish everything, then exit
Tasks' own stdout goes to stderr in this mode, so stdout carries nothing but the protocol.
"""
from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from executor import logs
from executor.serve.server import Answer, RequestError, Server

MAX_BODY = 4 << 20
MAX_WAIT = 3600.0
MAX_LINE, MAX_HEADERS = 65536, 100  # http.client's limits


class _Headers(dict):
    """Request headers by lower-cased name; get() as email.message's (the first of repeated ones)."""

    def get(self, name: str, default=None):
        return super().get(name.lower(), default)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "executor-serve"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall
    core: Server  # set on the subclass made by http_server()

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature (its errors only, now)
        logs.debug("http", detail=format % args)

    def parse_request(self) -> bool:
        """An HTTP/1.1 request's headers read by a plain loop: http.client's email parser costs more
        than the rest of a request's handling. Anything else goes to the standard parse."""
        words = self.raw_requestline.split()
        if len(words) != 3 or words[2] != b"HTTP/1.1" or words[1].startswith(b"//"):
            return super().parse_request()
        self.request_version = "HTTP/1.1"
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.command, self.path = str(words[0], "iso-8859-1"), str(words[1], "iso-8859-1")
        self.headers = headers = _Headers()
        for _ in range(MAX_HEADERS + 1):
            line = self.rfile.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                self.close_connection = True
                self.send_error(431, "Line too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = str(line, "iso-8859-1").partition(":")
            headers.setdefault(name.strip().lower(), value.strip())
        else:
            self.close_connection = True
            self.send_error(431, "Too many headers")
            return False
        self.close_connection = headers.get("Connection", "").lower() == "close"
        if headers.get("Expect", "").lower() == "100-continue":
            return self.handle_expect_100()
        return True

    # --- routing -----------------------------------------------------------------------------------

    def do_GET(self):
        path, query = self._target()
        if path == "/healthz":
            return self._text(200, "ok\n")
        if path == "/readyz":
            return self._text(200, "ready\n") if self.core.ready else self._text(503, "draining\n")
        if path == "/metrics":
            return self._text(200, self.core.metrics_text(), "text/plain; version=0.0.4; charset=utf-8")
        invocation_id = self._invocation_id(path)
        if invocation_id is None:
            return self._json(404, {"error": "not found", "reason": f"no route {path}"})
        answer = self.core.get(invocation_id)
        if answer.record is not None and (wait := self._wait(query)):
            return self._answer_when_done(answer.record, wait)
        self._answer(answer)

    def do_POST(self):
        path, query = self._target()
        if path != "/invocations":
            return self._json(404, {"error": "not found", "reason": f"POST {path}: use POST /invocations"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            return self._json(413 if length > MAX_BODY else 400, {"error": "bad request", "reason": "Content-Length"})
        raw = self.rfile.read(length)
        try:
            answer = self.core.submit(json.loads(raw))
        except (ValueError, RequestError) as e:
            return self._json(400, {"error": "bad request", "reason": str(e)})
        if answer.status == 202 and answer.record is not None and (wait := self._wait(query)):
            return self._answer_when_done(answer.record, wait)
        self._answer(answer)

    def do_DELETE(self):
        path, _ = self._target()
        invocation_id = self._invocation_id(path)
        if invocation_id is None:
            return self._json(404, {"error": "not found", "reason": f"no route {path}"})
        self._answer(self.core.cancel(invocation_id))

    # --- helpers -------------------------------------------------------------------------------------

    def _target(self) -> tuple[str, dict]:
        parts = urlsplit(self.path)
        return parts.path.rstrip("/") or "/", parse_qs(parts.query)

    @staticmethod
    def _invocation_id(path: str) -> str | None:
        prefix = "/invocations/"
        if path.startswith(prefix) and len(path) > len(prefix) and "/" not in path[len(prefix):]:
            from urllib.parse import unquote

            return unquote(path[len(prefix):])
        return None

    @staticmethod
    def _wait(query: dict) -> float:
        try:
            return max(0.0, min(MAX_WAIT, float(query.get("wait", ["0"])[0])))
        except ValueError:
            return 0.0

    def _answer_when_done(self, record, wait: float) -> None:
        """Wait up to `wait` seconds for the invocation to finish. The finished result is written by the
        thread that hears of it (the worker's reader), so the caller's answer does not also wait for
        this thread to wake; a result that does not fit the socket at once is finished from here."""
        lock = threading.Lock()
        state = {"sent": False, "rest": b""}

        def send_now(answer: Answer) -> None:
            data = self._answer_bytes(answer)
            with lock:
                if state["sent"]:
                    return
                state["sent"] = True
                try:
                    sent = self.connection.send(data, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:  # the caller is gone: this thread's next read finds out
                    sent = len(data)
                state["rest"] = data[sent:]
            logs.debug("http", request=self.requestline, status=answer.status)

        answer = self.core.wait(record, wait, on_done=send_now)
        with lock:
            if not state["sent"]:
                state["sent"] = True
                state["rest"] = self._answer_bytes(answer)
            rest = state["rest"]
        if rest:
            self.wfile.write(rest)

    def _answer(self, answer: Answer) -> None:
        self.wfile.write(self._answer_bytes(answer))
        logs.debug("http", request=self.requestline, status=answer.status)

    def _answer_bytes(self, answer: Answer) -> bytes:
        headers = {}
        if answer.status in (429, 503):
            headers["Retry-After"] = "1"
        if answer.record is not None and answer.status in (200, 202):
            headers["Location"] = f"/invocations/{answer.record.id}"
        return self._response(answer.status, (json.dumps(answer.body) + "\n").encode(), "application/json", headers)

    def _json(self, status: int, body: dict) -> None:
        self._send(status, (json.dumps(body) + "\n").encode(), "application/json")

    def _text(self, status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
        self._send(status, text.encode(), content_type)

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.wfile.write(self._response(status, data, content_type))
        logs.debug("http", request=self.requestline, status=status)

    def _response(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> bytes:
        # One write for the whole response (send_response & co. cost more than the request's work).
        lines = [f"{self.protocol_version} {status} {self.responses.get(status, ('',))[0]}",
                 f"Server: {self.server_version}", f"Date: {_http_date()}",
                 f"Content-Type: {content_type}", f"Content-Length: {len(data)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        from email.utils import formatdate

        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def http_server(core: Server, address: tuple[str, int]) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"core": core})
    return _HTTPServer(address, handler)


class JsonLines:
    """The --stdio front-end: requests from `stdin`, responses and events to `stdout`."""

    def __init__(self, core: Server, stdin, stdout):
        self.core = core
        self.stdin = stdin
        self.stdout = stdout
        self._write_lock = threading.Lock()
        self.ended = threading.Event()  # end of input
        core.listeners.append(lambda record: self._write({"event": "finished", **record.to_json()}))

    def start(self) -> None:
        threading.Thread(target=self._read, name="stdio", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.stdin:
                if line.strip():
                    self._handle(line)
        finally:
            self.ended.set()

    def _handle(self, line: str) -> None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
        except ValueError as e:
            return self._write({"event": "error", "status": 400, "reason": f"not a JSON object: {e}"})
        op = request.pop("op", "invoke")
        rid = request.get("id")
        try:
            if op == "invoke":
                answer = self.core.submit(request)
                accepted = answer.status in (200, 202)
                self._write({"event": "accepted" if accepted else "rejected", "status": answer.status, **answer.body})
                if answer.status == 200 and answer.record is not None:  # a retried id that already finished
                    self._write({"event": "finished", **answer.record.to_json()})
            # "id" always: a 404's body has none, and a client with several requests out could not
            # tell which one it answers.
            elif op == "get":
                answer = self.core.get(str(rid))
                self._write({"event": "status", "status": answer.status, "id": rid, **answer.body})
            elif op == "cancel":
                answer = self.core.cancel(str(rid))
                self._write({"event": "cancel", "status": answer.status, "id": rid, **answer.body})
            elif op == "metrics":
                self._write({"event": "metrics", "text": self.core.metrics_text()})
            else:
                self._write({"event": "error", "status": 400, "id": rid, "reason": f"unknown op {op!r}"})
        except RequestError as e:
            self._write({"event": "rejected", "status": 400, "id": rid, "error": "bad request", "reason": str(e)})

    def _write(self, message: dict) -> None:
        data = json.dumps(message) + "\n"
        with self._write_lock:
            try:
                self.stdout.write(data)
                self.stdout.flush()
            except (OSError, ValueError):
                pass


def stdio_streams():
    """The protocol's own stdout, and fd 1 pointed at stderr for everything else (tasks, stray prints)."""
    import os

    protocol_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return sys.stdin, protocol_out

"""A real `executor serve` process on loopback, and a small HTTP client for it."""
from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers import REPO, env_with, pyflyte_execute_args, write_inputs

TASKS = "tests.sample_tasks.serve_tasks"


class Server:
    """`python -m executor serve ARGS` with its log in a file; `.url` once it listens."""

    def __init__(self, tmp: Path, *args: str, env: dict | None = None, stdio: bool = False, python: str | None = None,
                 base_env: dict | None = None):
        self.tmp = tmp
        self.log_path = tmp / f"serve-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        argv = [python or sys.executable, "-m", "executor", "serve", *(["--stdio"] if stdio else ["--listen", "127.0.0.1:0"]),
                "--work-dir", str(tmp / "serve-work"), *args]
        self.proc = subprocess.Popen(
            argv, env={**(base_env if base_env is not None else env_with()), "EXECUTOR_RETRY_BASE_DELAY": "0.05", **(env or {})},
            cwd=str(REPO),
            stdin=subprocess.PIPE if stdio else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdio else self._log, stderr=self._log, text=True,
        )
        self.port = None
        self._events: list[dict] | None = None  # --stdio: event lines not yet taken by event()
        self._events_changed = threading.Condition()
        self._events_ended = False
        if not stdio:
            end = time.monotonic() + 60
            while self.port is None:
                match = re.search(r"url=http://127\.0\.0\.1:(\d+)", self.log())
                if match:
                    self.port = int(match.group(1))
                    break
                assert self.proc.poll() is None, f"the server exited: {self.log()}"
                assert time.monotonic() < end, f"the server never listened: {self.log()}"
                time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text()

    def request(self, method: str, path: str, body: dict | bytes | None = None, timeout: float = 120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            content = json.loads(raw) if response.getheader("Content-Type", "").startswith("application/json") else raw.decode()
            return response.status, content, dict(response.getheaders())
        finally:
            conn.close()

    def post(self, body: dict, wait: float = 0):
        status, content, _ = self.request("POST", f"/invocations?wait={wait}", body)
        return status, content

    def get(self, invocation_id: str, wait: float = 0):
        status, content, _ = self.request("GET", f"/invocations/{invocation_id}?wait={wait}")
        return status, content

    def run(self, body: dict, timeout: float = 120) -> dict:
        """POST, then wait for the finished record."""
        status, content = self.post(body, wait=timeout)
        assert status in (200, 202), (status, content)
        if content["state"] != "done":
            status, content = self.get(body["id"], wait=timeout)
        assert content["state"] == "done", content
        return content

    def wait_done(self, invocation_id: str, timeout: float = 120) -> dict:
        status, content = self.get(invocation_id, wait=timeout)
        assert status == 200 and content["state"] == "done", content
        return content

    def metrics(self) -> str:
        return self.request("GET", "/metrics")[1]

    def metric(self, name: str, **labels) -> float:
        """The value of one sample (0 when absent)."""
        return metric_sample(self.metrics(), name, **labels)

    # --- JSON lines (--stdio), interactively: send() a request, event() takes the answer -----------

    def send(self, request: dict) -> None:
        """One request line on the server's stdin."""
        if self._events is None:
            self._events = []
            threading.Thread(target=self._read_events, name="stdio-events", daemon=True).start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def end_input(self) -> None:
        self.proc.stdin.close()

    def _read_events(self) -> None:
        try:
            for line in self.proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:  # every line must be the protocol: a test sees this one among the events
                    event = {"event": "not json", "line": line}
                with self._events_changed:
                    self._events.append(event)
                    self._events_changed.notify_all()
        finally:
            with self._events_changed:
                self._events_ended = True  # end of the server's stdout
                self._events_changed.notify_all()

    def event(self, timeout: float = 120, **fields) -> dict:
        """The first event line not taken yet whose fields have these values; taken."""
        end = time.monotonic() + timeout
        with self._events_changed:
            while True:
                for e in self._events:
                    if all(e.get(k) == v for k, v in fields.items()):
                        self._events.remove(e)
                        return e
                left = end - time.monotonic()
                assert left > 0 and not self._events_ended, \
                    f"no event {fields} (pending: {self._events}): {self.log()[-3000:]}"
                self._events_changed.wait(min(left, 0.5))

    def pending_events(self) -> list[dict]:
        with self._events_changed:
            return list(self._events or [])

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def metric_sample(text: str, name: str, **labels) -> float:
    """The value of one sample of Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        if sample == name and (label_text.rstrip("}") == want if labels else not label_text):
            return float(value)
    return 0.0


def invocation(tmp: Path, name: str, task: str, values: dict, annotations: dict | None = None, *,
               env: dict | None = None, isolation: str | None = None, extra: list[str] | None = None,
               module: str = TASKS) -> dict:
    """A POST body for `task` of `module` with `values`, its output prefix under tmp/<name>."""
    root = tmp / name
    inputs = write_inputs(root / "inputs.pb", values, annotations or {k: type(v) for k, v in values.items()})
    body = {"id": name, "argv": pyflyte_execute_args(inputs, root / "out", module, task, extra=extra), "env": env or {}}
    if isolation:
        body["isolation"] = isolation
    return body


def output_value(tmp: Path, name: str):
    from flyteidl.core import literals_pb2

    m = literals_pb2.LiteralMap()
    m.ParseFromString((tmp / name / "out" / "outputs.pb").read_bytes())
    lit = m.literals["o0"]
    scalar = lit.scalar
    if scalar.HasField("primitive"):
        p = scalar.primitive
        return getattr(p, p.WhichOneof("value"))
    if scalar.HasField("binary"):
        import msgpack

        return msgpack.unpackb(scalar.binary.value)
    raise AssertionError(f"unexpected literal {lit}")


def error_doc(tmp: Path, name: str):
    from flyteidl.core import errors_pb2

    doc = errors_pb2.ErrorDocument()
    doc.ParseFromString((tmp / name / "out" / "error.pb").read_bytes())
    return doc.error


def out_files(tmp: Path, name: str) -> list[str]:
    out = tmp / name / "out"
    return sorted(p.name for p in out.iterdir() if p.is_file()) if out.exists() else []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def scratch_env(tmp: Path, name: str) -> dict:
    scratch = tmp / f"scratch-{name}"
    scratch.mkdir(parents=True, exist_ok=True)
    return {"SCRATCH": str(scratch)}


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


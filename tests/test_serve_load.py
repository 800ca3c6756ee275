"""Load: many invocations through one warm server at concurrency 8, with failures, timeouts, cancels
and retried POSTs mixed in. Every invocation must end with exactly one outputs.pb or error.pb (none
lost, none doubled, none run twice), and the server's and its workers' memory must stay flat.

    EXECUTOR_LOAD_N=10000 pytest tests/test_serve_load.py     # the full run (the default)
    EXECUTOR_LOAD_N=2000 pytest tests/test_serve_load.py      # a quicker one

The mix, by invocation number i: every 100th (from 7) times out, every 50th (from 3) is cancelled
right after it is accepted, every 97th (from 5) is POSTed twice, every 13th fails in the task. Every
5th runs in-process, and so do the timeouts and cancels of every other hundred (each of them takes
its runner: the next in-process invocation needs a fresh one); the rest run in a fresh isolated
child. Each success returns "<i>:<its id>" from an env var only that invocation has: a mixed-up env
or input would show.
"""
from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections import Counter

import pytest

from tests.helpers import pyflyte_execute_args, write_inputs
from tests.serve_rig import TASKS, Server, error_doc, output_value

N = int(os.environ.get("EXECUTOR_LOAD_N", "10000"))
CONCURRENCY = 8
WARMUP = min(500, N // 5)
MIB = 2**20


def kind_of(i: int) -> str:
    if i % 100 == 7:
        return "timeout"
    if i % 50 == 3:
        return "cancel"
    return "fail" if i % 13 == 0 else "ok"


def isolation_of(i: int) -> str:
    if kind_of(i) in ("timeout", "cancel"):  # i % 5 is never 0 for them: half of them in-process
        return "inprocess" if (i // 100) % 2 else "fork"
    return "inprocess" if i % 5 == 0 else "fork"


def expected_code(kind: str) -> str | None:
    return {"timeout": "TIMEOUT", "cancel": "PREEMPTED", "fail": "USER", "ok": None}[kind]


class Client:
    """One keep-alive connection; a load thread each."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(3):
            try:
                self.conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
                response = self.conn.getresponse()
                return response.status, json.loads(response.read())
            except (ConnectionError, http.client.HTTPException):
                if attempt == 2:
                    raise
                self.conn.close()  # a fresh connection; the request is idempotent by id
        raise AssertionError("unreachable")


@pytest.mark.slow
def test_load_every_invocation_ends_with_exactly_one_document(tmp_path):
    scratch = tmp_path / "markers"
    scratch.mkdir()
    inputs = {x: write_inputs(tmp_path / "inputs" / f"{x}.pb", {"x": x}, {"x": int}) for x in (1,)}
    # Workers are never recycled here, so a leak in a long-lived one (the fork server, an in-process
    # runner) would accumulate where the memory check sees it.
    server = Server(tmp_path, "--concurrency", str(CONCURRENCY), "--backlog", "64", "--history", "1000",
                    "--max-invocations-per-worker", "0")
    bodies = {}
    for i in range(N):
        kind = kind_of(i)
        x = 1 if kind in ("timeout", "cancel") else i
        if x not in inputs:
            inputs[x] = write_inputs(tmp_path / "inputs" / f"{x}.pb", {"x": x}, {"x": int})
        name = f"inv-{i:05d}"
        env = {"MARK": name, "SCRATCH": str(scratch)}
        if kind == "timeout":
            env.update(SLEEP_SECONDS="30", EXECUTOR_TIMEOUT_SECONDS="0.5", EXECUTOR_GRACE_SECONDS="0.5")
        if kind == "cancel":
            env.update(SLEEP_SECONDS="30", EXECUTOR_GRACE_SECONDS="0.5")
        body = {"id": name, "argv": pyflyte_execute_args(inputs[x], tmp_path / "out" / name / "out", TASKS, "mark"), "env": env}
        if isolation_of(i) == "inprocess":
            body["isolation"] = "inprocess"
        bodies[i] = body

    statuses: Counter = Counter()  # (request, HTTP status) of each invocation's answers (busy ones retried)
    isolations: Counter = Counter()  # (isolation, kind), as the finished records say
    errors: list[str] = []
    lock = threading.Lock()

    def drive(indices: list[int]) -> None:
        client = Client(server.port)
        for i in indices:
            body = bodies[i]
            try:
                answers = []  # (request, HTTP status)
                if kind_of(i) == "cancel":
                    status, _ = _post(client, body, wait=0)
                    answers.append(("POST", status))
                    answers.append(("DELETE", client.call("DELETE", f"/invocations/{body['id']}")[0]))
                    status, record = client.call("GET", f"/invocations/{body['id']}?wait=120")
                    answers.append(("GET", status))
                else:
                    status, record = _post(client, body, wait=120)
                    answers.append(("POST", status))
                    if i % 97 == 5:  # the caller retries: the same invocation comes back, nothing runs again
                        again_status, again = _post(client, body, wait=120)
                        assert again_status == 200 and again["result"] == record["result"], again
                with lock:
                    statuses.update(answers)
                    isolations[record["isolation"], kind_of(i)] += 1
                assert record["state"] == "done", record
            except Exception as e:  # collected: a load thread must not die silently
                with lock:
                    errors.append(f"{body['id']}: {type(e).__name__}: {e}")

    def run_phase(indices: list[int]) -> None:
        slices = [indices[k::CONCURRENCY] for k in range(CONCURRENCY)]
        threads = [threading.Thread(target=drive, args=(s,)) for s in slices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    try:
        started = time.monotonic()
        run_phase(list(range(WARMUP)))
        memory_start = _memory(server)
        run_phase(list(range(WARMUP, N)))
        memory_end = _memory(server)
        elapsed = time.monotonic() - started
        metrics_total = sum(server.metric("executor_serve_invocations_total", outcome=o, code=c)
                            for o, c in (("success", ""), ("failure", "USER"), ("failure", "TIMEOUT"), ("failure", "PREEMPTED")))
        assert server.stop() == 0
    finally:
        server.kill()
    assert errors == [], errors[:20]
    cancels = sum(1 for i in range(N) if kind_of(i) == "cancel")
    # A cancel is accepted (202: a 30 s task cannot be done at once) and cancelled (202: still running);
    # everything else is answered done within its wait (200), never left at 202.
    assert statuses == Counter({("POST", 200): N - cancels, ("POST", 202): cancels, ("DELETE", 202): cancels,
                                ("GET", 200): cancels}), statuses
    if N >= 200:  # each kind landed on both isolations
        for kind in ("timeout", "cancel", "fail", "ok"):
            assert isolations["fork", kind] and isolations["inprocess", kind], isolations
    print(f"\n{N} invocations in {elapsed:.1f} s ({N / elapsed:.0f}/s); memory start {memory_start}, end {memory_end}")

    # every invocation: exactly one document, the right one, with the right content
    kinds = Counter()
    for i, body in bodies.items():
        kind = kind_of(i)
        kinds[kind] += 1
        out = tmp_path / "out" / body["id"] / "out"
        files = sorted(p.name for p in out.iterdir() if p.is_file())
        if kind == "ok":
            assert files == ["outputs.pb"], (body["id"], files)
            assert output_value(tmp_path / "out", body["id"]) == f"{i}:{body['id']}"
        else:
            assert files == ["error.pb"], (body["id"], files)
            assert error_doc(tmp_path / "out", body["id"]).code == expected_code(kind), body["id"]
    assert metrics_total == N

    # none ran twice (the marker is created exclusively), and every one that was not cancelled ran
    markers = set(os.listdir(scratch))
    ran = {bodies[i]["id"] for i in bodies if kind_of(i) != "cancel"}
    assert ran <= markers and markers <= {b["id"] for b in bodies.values()}

    # memory: flat between the end of the warm-up and the end (generous margins: a leak per invocation
    # over thousands of invocations would still show)
    for part, margin in (("server", 32 * MIB), ("fork_servers", 32 * MIB), ("largest_runner", 32 * MIB)):
        assert memory_end[part] <= memory_start[part] * 1.5 + margin, (part, memory_start, memory_end)
    assert memory_start["fork_servers"] and memory_end["fork_servers"]  # the same warm worker all along
    # descriptors: each runner holds a few; nothing per invocation may stay open
    assert memory_end["fork_server_fds"] <= memory_start["fork_server_fds"] + 6 * CONCURRENCY, (memory_start, memory_end)
    assert kinds["timeout"] and kinds["cancel"] and kinds["fail"]


def _post(client: Client, body: dict, wait: float) -> tuple[int, dict]:
    while True:
        status, content = client.call("POST", f"/invocations?wait={wait}", body)
        if status != 429:
            assert status in (200, 202), content
            return status, content
        time.sleep(0.05)  # busy: the documented answer; try again


def _memory(server: Server) -> dict:
    """Resident bytes, once nothing runs: the server, its fork servers, and the largest of their
    children (in-process runners and the spare isolated child)."""
    import psutil

    deadline = time.monotonic() + 60
    while server.metric("executor_serve_in_flight") or server.metric("executor_serve_queued"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # let the last children exit
    main = psutil.Process(server.proc.pid)

    def rss(p) -> int:
        try:
            return p.memory_info().rss
        except psutil.Error:
            return 0

    fork_servers = main.children()
    children = [c for f in fork_servers for c in f.children()]
    return {"server": rss(main), "fork_servers": sum(rss(f) for f in fork_servers),
            "largest_runner": max([rss(c) for c in children] or [0]), "runners": len(children),
            "fork_server_fds": sum(len(os.listdir(f"/proc/{f.pid}/fd")) for f in fork_servers)}

"""`executor serve` with real HTTP on loopback, real processes and real signals."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flyteidl.core import security_pb2, tasks_pb2

from tests.helpers import REPO, env_with
from tests.serve_rig import (TASKS, Server, alive, descendants, error_doc, invocation, metric_sample, out_files,
                             output_value, scratch_env, wait_for)

SECRET = "t0ken-9f8e7d6c-serve"


@pytest.fixture
def server(tmp_path):
    servers = []

    def start(*args, **kwargs) -> Server:
        s = Server(tmp_path, *args, **kwargs)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.kill()


def _template(path: Path, secrets=(), env=None, retries: int = 0) -> Path:
    t = tasks_pb2.TaskTemplate()
    t.id.name = "sample"
    t.metadata.retries.retries = retries
    for k, v in (env or {}).items():
        t.container.env.add(key=k, value=v)
    t.security_context.secrets.extend(secrets)
    path.write_bytes(t.SerializeToString())
    return path


# --- the API ------------------------------------------------------------------------------------


def test_health_ready_and_metrics_families(server):
    s = server()
    assert s.request("GET", "/healthz")[:2] == (200, "ok\n")
    assert s.request("GET", "/readyz")[:2] == (200, "ready\n")
    status, text, headers = s.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    for family in ("invocations_total", "invocation_duration_seconds", "in_flight", "queued", "pools", "workers",
                   "pool_requests_total", "bundle_cache_total", "rejected_total", "worker_recycles_total",
                   "inprocess_dispatch_total", "leased_runners"):
        assert f"# TYPE executor_serve_{family} " in text, family


def test_post_runs_the_task_and_get_returns_the_result(server, tmp_path):
    s = server()
    body = invocation(tmp_path, "add-1", "add", {"a": 40, "b": 2})
    status, accepted = s.post(body)
    assert status == 202 and accepted["id"] == "add-1" and accepted["state"] in ("queued", "running")
    record = s.wait_done("add-1")
    result = record["result"]
    assert result["outcome"] == "success" and result["error"] is None
    assert result["files"] == [str(tmp_path / "add-1" / "out" / "outputs.pb")]
    assert set(result["phases_ms"]) >= {"spec", "load", "inputs", "run", "outputs", "upload"}
    assert record["timings_ms"]["total"] >= record["timings_ms"]["running"]
    assert output_value(tmp_path, "add-1") == 42
    assert s.metric("executor_serve_invocations_total", outcome="success", code="") == 1
    assert s.metric("executor_serve_invocation_duration_seconds_count", isolation="fork") == 1


def test_warm_files_are_byte_identical_to_the_one_shot_path(server, tmp_path):
    s = server()
    for name, task, values in (("ok", "add", {"a": 1, "b": 2}), ("bad", "fail", {"x": 3})):
        warm = invocation(tmp_path, f"warm-{name}", task, {**values})
        s.run(warm)
        cold = invocation(tmp_path, f"cold-{name}", task, {**values})
        proc = subprocess.run([sys.executable, "-m", "executor", *cold["argv"]], env=env_with(), cwd=str(REPO),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert out_files(tmp_path, f"warm-{name}") == out_files(tmp_path, f"cold-{name}")
    assert (tmp_path / "warm-ok/out/outputs.pb").read_bytes() == (tmp_path / "cold-ok/out/outputs.pb").read_bytes()
    warm_error, cold_error = error_doc(tmp_path, "warm-bad"), error_doc(tmp_path, "cold-bad")
    assert (warm_error.code, warm_error.kind, warm_error.origin) == (cold_error.code, cold_error.kind, cold_error.origin)
    assert warm_error.message.splitlines()[0] == cold_error.message.splitlines()[0] == "USER: ValueError: no good: 3"
    assert "in fail" in warm_error.message and "serve_tasks.py" in warm_error.message  # the user's frame


def test_a_retried_post_never_runs_the_task_twice(server, tmp_path):
    s = server("--concurrency", "4")
    body = invocation(tmp_path, "once", "record_run", {"x": 7}, env=scratch_env(tmp_path, "once"))
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(s.post(body))) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [a[0] for a in answers]
    assert len(statuses) == 5 and set(statuses) <= {200, 202} and 202 in statuses  # 200: it had finished already
    assert s.wait_done("once")["result"]["outcome"] == "success"
    status, again = s.post(body, wait=5)
    assert status == 200 and again["result"]["outcome"] == "success"
    assert (tmp_path / "scratch-once" / "runs").read_text() == "7\n"
    assert s.metric("executor_serve_invocations_total", outcome="success", code="") == 1
    changed = dict(body, env={**body["env"], "OTHER": "1"})
    status, conflict = s.post(changed)
    assert status == 409 and conflict["error"] == "conflict"


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "Expecting"),
    (b'["a list"]', "JSON object"),
    (json.dumps({"id": "x", "argv": []}).encode(), '"argv"'),
    (json.dumps({"id": "", "argv": ["pyflyte-execute"]}).encode(), '"id"'),
    (json.dumps({"id": "x", "argv": ["pyflyte-execute", "--output-prefix", "o", "--", "task-module", "m",
                                     "task-name", "t"]}).encode(), "--inputs"),
    (json.dumps({"id": "x", "argv": ["rm", "-rf", "/"]}).encode(), "argv[0]"),
    (json.dumps({"id": "x", "argv": ["pyflyte-execute"], "env": {"A": 1}}).encode(), '"env"'),
    (json.dumps({"id": "x", "argv": ["pyflyte-execute"], "isolation": "none"}).encode(), '"isolation"'),
    (json.dumps({"id": "x", "argv": ["pyflyte-execute"], "surprise": 1}).encode(), "surprise"),
])
def test_unusable_requests_are_400_and_name_the_problem(server, tmp_path, body, reason):
    s = server()
    status, content, _ = s.request("POST", "/invocations", body)
    assert status == 400 and reason in content["reason"], content
    assert s.metric("executor_serve_invocations_total", outcome="failure", code="USER") == 0


def test_raw_http_headers_keep_alive_expect_and_limits(server, tmp_path):
    import socket

    s = server()
    body = json.dumps(invocation(tmp_path, "raw", "add", {"a": 2, "b": 3})).encode()

    def exchange(sock, request: bytes) -> bytes:
        sock.sendall(request)
        sock.settimeout(60)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    with socket.create_connection(("127.0.0.1", s.port)) as sock:  # lower-case names; the connection stays open
        answer = exchange(sock, b"POST /invocations?wait=60 HTTP/1.1\r\nhost: x\r\ncontent-LENGTH: %d\r\n\r\n%s"
                          % (len(body), body))
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"outcome": "success"' in answer
        assert exchange(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200 ")
        answer = exchange(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in answer and sock.recv(1) == b""
    with socket.create_connection(("127.0.0.1", s.port)) as sock:  # curl's way with a large body
        sock.settimeout(60)
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        assert exchange(sock, body).startswith(b"HTTP/1.1 200 ")  # already done: the same invocation
    with socket.create_connection(("127.0.0.1", s.port)) as sock:
        many = b"".join(b"X-%d: y\r\n" % i for i in range(101))
        assert exchange(sock, b"GET /healthz HTTP/1.1\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 431 ")
    with socket.create_connection(("127.0.0.1", s.port)) as sock:  # HTTP/1.0: the standard parse, then close
        answer = exchange(sock, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and sock.recv(1) == b""


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_unknown_ids_and_routes(server):
    s = server()
    assert s.get("nope")[0] == 404
    assert s.request("DELETE", "/invocations/nope")[0] == 404
    assert s.request("GET", "/elsewhere")[0] == 404
    assert s.request("POST", "/elsewhere", {})[0] == 404


def test_long_poll_returns_when_done(server, tmp_path):
    s = server()
    body = invocation(tmp_path, "poll", "sleep_then_add", {"a": 1, "b": 1}, env={"SLEEP_SECONDS": "0.5"})
    assert s.post(body)[0] == 202
    status, record = s.get("poll", wait=60)
    assert status == 200 and record["state"] == "done" and output_value(tmp_path, "poll") == 2


# --- isolation -----------------------------------------------------------------------------------


def test_each_invocation_sees_only_its_own_env(server, tmp_path):
    s = server("--concurrency", "4", "--pass-env", "PASSED,PREFIX_*",
               env={"PASSED": "from-server", "PREFIX_A": "a", "NOT_PASSED": "hidden", "OVERRIDDEN": "server"})
    bodies = [
        invocation(tmp_path, f"env-{i}", "env_of", {"names": "MINE,PASSED,PREFIX_A,NOT_PASSED,OVERRIDDEN,PATH"},
                   env={"MINE": f"välue-{i} ✓", **({"OVERRIDDEN": "request"} if i == 0 else {})}, isolation=iso)
        for i, iso in enumerate(["fork", "fork", "inprocess", "inprocess"])
    ]
    for body in bodies:
        assert s.post(body)[0] == 202
    for i, body in enumerate(bodies):
        assert s.wait_done(body["id"])["result"]["outcome"] == "success"
        seen = output_value(tmp_path, body["id"])["values"]
        assert seen["MINE"] == f"välue-{i} ✓"  # not ASCII: as os.environ encodes it
        assert seen["PASSED"] == "from-server" and seen["PREFIX_A"] == "a"
        assert seen["NOT_PASSED"] == "<unset>" and seen["PATH"] == "<unset>"  # replaced, not merged
        assert seen["OVERRIDDEN"] == ("request" if i == 0 else "<unset>")


def test_map_task_elements_follow_each_invocations_env(server, tmp_path):
    from tests.helpers import DEFAULT_RESOLVER, MAP_RESOLVER, write_inputs

    s = server("--concurrency", "3")
    inputs = write_inputs(tmp_path / "map-inputs.pb", {"values": [10, 20, 30], "factor": 2}, {"values": list[int], "factor": int})
    for i in range(3):
        prefix = tmp_path / f"map-{i}" / "out"
        argv = ["pyflyte-map-execute", "--inputs", str(inputs), "--output-prefix", str(prefix), "--resolver", MAP_RESOLVER,
                "--", "vars", "factor", "resolver", DEFAULT_RESOLVER, "task-module", TASKS, "task-name", "pick"]
        env = {"BATCH_JOB_ARRAY_INDEX_VAR_NAME": "FLYTE_K8S_ARRAY_INDEX", "FLYTE_K8S_ARRAY_INDEX": str(i)}
        assert s.post({"id": f"map-{i}", "argv": argv, "env": env, **({"isolation": "inprocess"} if i == 1 else {})})[0] == 202
    for i in range(3):
        assert s.wait_done(f"map-{i}")["result"]["outcome"] == "success"
    assert [output_value(tmp_path, f"map-{i}") for i in range(3)] == [20, 40, 60]


def test_flyte2_a0_argv_warm_matches_its_one_shot_run(server, tmp_path):
    from flyteidl2.task import common_pb2

    from tests.test_a0 import ENV, RESOLVER, write_inputs as write_a0_inputs

    s = server()
    inputs = write_a0_inputs(tmp_path / "a0-inputs.pb", a=2, b=3)
    bodies = {}
    for name in ("warm", "cold"):
        argv = ["a0", "--inputs", str(inputs), "--outputs-path", str(tmp_path / name / "out"), "--version", "v1",
                "--raw-data-path", str(tmp_path / name / "raw"), "--run-name", "{{.runName}}", "--name", "a0",
                "--resolver", RESOLVER, "mod", "tests.differential.plain_tasks", "instance", "describe_ints"]
        bodies[name] = {"id": name, "argv": argv, "env": {**ENV, "RUN_NAME": f"run-of-{name}"}}
    record = s.run(bodies["warm"])
    assert record["result"]["outcome"] == "success" and record["pool"] == "image:tests.differential.plain_tasks"
    proc = subprocess.run([sys.executable, "-m", "executor", *bodies["cold"]["argv"]], env=env_with(bodies["cold"]["env"]),
                          cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    warm = (tmp_path / "warm" / "out" / "outputs.pb").read_bytes()
    assert warm == (tmp_path / "cold" / "out" / "outputs.pb").read_bytes()
    outputs = common_pb2.Outputs.FromString(warm)
    assert [(n.name, n.value.scalar.primitive.integer) for n in outputs.literals] == [("o0", 5), ("o1", 6)]


def test_module_state_never_leaks_between_isolated_invocations(server, tmp_path):
    s = server("--concurrency", "1")
    counts = [s.run(invocation(tmp_path, f"fork-{i}", "count_calls", {"x": i})) and output_value(tmp_path, f"fork-{i}")
              for i in range(3)]
    assert counts == [1, 1, 1]
    # In-process is the documented trade-off: one warm runner, its module state carries over.
    inproc = [s.run(invocation(tmp_path, f"inproc-{i}", "count_calls", {"x": i}, isolation="inprocess"))
              and output_value(tmp_path, f"inproc-{i}") for i in range(3)]
    assert inproc == [1, 2, 3]


def test_a_task_that_does_not_load_fails_alone(server, tmp_path):
    # The first invocation is what the pool's zygote rehearses before its first spare: that it cannot
    # load the task changes nothing for the invocations after it.
    s = server("--concurrency", "1")
    broken = s.run(invocation(tmp_path, "broken", "no_such_task", {"a": 1, "b": 1}))["result"]
    assert broken["outcome"] == "failure" and broken["error"]["phase"] == "load", broken
    assert error_doc(tmp_path, "broken").code == broken["error"]["code"]
    for i in range(3):
        assert s.run(invocation(tmp_path, f"fine-{i}", "add", {"a": i, "b": 1}))["result"]["outcome"] == "success"
        assert output_value(tmp_path, f"fine-{i}") == i + 1


def test_spares_are_forked_between_attempts_not_during_them(server, tmp_path):
    import psutil

    s = server("--concurrency", "2")
    assert s.run(invocation(tmp_path, "first", "add", {"a": 1, "b": 1}))["result"]["outcome"] == "success"
    fork_server = psutil.Process(s.proc.pid).children()[0]

    def spares() -> set[int]:
        while True:
            try:  # a child may exit between being listed and asked for its own children: list again
                zygotes = [c for c in fork_server.children() if c.children()]
                return {c.pid for z in zygotes for c in z.children()}
            except psutil.NoSuchProcess:
                continue

    def settled() -> set[int] | None:
        before = spares()
        time.sleep(0.3)
        return before if len(before) >= 2 and spares() == before else None

    idle = wait_for(settled, what="the spares to be made")
    assert s.post(invocation(tmp_path, "slow", "sleepy", {"seconds": 1.5}, env=scratch_env(tmp_path, "slow")))[0] == 202
    wait_for(lambda: (tmp_path / "scratch-slow" / "started").exists(), what="the task to start")
    running = int((tmp_path / "scratch-slow" / "started").read_text())
    assert running in idle
    for _ in range(10):  # a spare is still in hand: none is forked while the attempt runs
        assert spares() == idle
        time.sleep(0.05)
    assert s.wait_done("slow")["result"]["outcome"] == "success"
    wait_for(lambda: running not in spares() and len(spares()) >= 2, what="the spares after the attempt")


@pytest.mark.parametrize("isolation", ["fork", "inprocess"])
def test_fresh_working_and_temp_directories(server, tmp_path, isolation):
    s = server("--concurrency", "1")
    seen = []
    for i in range(2):
        s.run(invocation(tmp_path, f"where-{i}", "where", {"content": f"from {i}"}, isolation=isolation))
        seen.append(output_value(tmp_path, f"where-{i}"))
    first, second = seen
    assert first["cwd"] != second["cwd"] and first["tmp"] != second["tmp"]
    assert first["TMPDIR"] == first["tmp"] and second["TMPDIR"] == second["tmp"]
    assert second["found"] == {"cwd": [], "tmp": []}  # nothing the first one left behind
    assert not os.path.exists(first["cwd"]) and not os.path.exists(first["tmp"])  # removed once finished


def test_secrets_are_per_invocation_and_redacted(server, tmp_path):
    s = server("--concurrency", "2")
    secret = security_pb2.Secret(group="api", key="token", env_var="MY_TOKEN")
    template = ["--task-template", str(_template(tmp_path / "t.pb", secrets=[secret]))]
    with_secret = invocation(tmp_path, "with", "shout_secret", {"x": -1}, env={"_FSEC_API_TOKEN": SECRET}, extra=template)
    without = invocation(tmp_path, "without", "secrets_visible", {"x": 1})
    missing = invocation(tmp_path, "missing", "shout_secret", {"x": 1}, extra=template)
    s.run(with_secret)
    s.run(without)
    record = s.run(missing)
    error = error_doc(tmp_path, "with")
    assert error.code == "USER" and "[redacted]" in error.message and SECRET not in error.message
    assert output_value(tmp_path, "without") == {}  # nothing of the other invocation's secret
    assert record["result"]["error"]["code"] == "SECRET_MISSING" and record["result"]["error"]["phase"] == "spec"
    s.stop()
    log = s.log()
    assert "stdout has [redacted]" in log and "stderr has [redacted]" in log
    assert SECRET not in log and SECRET.encode() not in (tmp_path / "with" / "out" / "error.pb").read_bytes()


def test_a_secret_never_reaches_a_later_invocations_subprocesses(server, tmp_path):
    s = server("--concurrency", "1")
    secret = security_pb2.Secret(group="api", key="token", env_var="MY_TOKEN")
    template = ["--task-template", str(_template(tmp_path / "t.pb", secrets=[secret]))]
    s.run(invocation(tmp_path, "holder", "subprocess_env", {"x": 1}, env={"_FSEC_API_TOKEN": SECRET}, extra=template))
    for isolation in ("fork", "inprocess"):
        s.run(invocation(tmp_path, f"later-{isolation}", "subprocess_env", {"x": 2}, isolation=isolation))
        assert SECRET not in output_value(tmp_path, f"later-{isolation}")
    assert f"MY_TOKEN={SECRET}" in output_value(tmp_path, "holder")  # its own subprocess has it


def test_no_child_can_reach_another_invocations_env_or_secret(server, tmp_path):
    # A task walks everything its process can reach (modules, the stack it inherited, every object the
    # collector tracks) for another invocation's env value and secret. The holder is the pool's first
    # invocation (what its zygote is forked after) and runs while the others start: isolated from a
    # spare, isolated forked for it (it has secrets of its own), in-process; then again after it ended.
    # Its id (and so its paths: inputs, outputs, checkpoints) carries the marker too.
    s = server("--concurrency", "4")
    head, tail = "leak-7c1f", "-e2a94b0d"
    holder_id = f"holder-{head}{tail}"
    secret = security_pb2.Secret(group="api", key="token", env_var="MY_TOKEN")
    with_secret = ["--task-template", str(_template(tmp_path / "t.pb", secrets=[secret]))]
    holder = invocation(tmp_path, holder_id, "until_released", {"seconds": 120.0}, extra=with_secret,
                        env={"HOLDER_VALUE": head + tail + "-env", "_FSEC_API_TOKEN": head + tail + "-secret",
                             **scratch_env(tmp_path, "holder")})
    assert s.post(holder)[0] == 202
    wait_for(lambda: (tmp_path / "scratch-holder" / "started").exists(), what="the holder to start")

    def scan(name: str, **kwargs) -> None:
        s.run(invocation(tmp_path, name, "find_marker", {"head": head, "tail": tail}, **kwargs))

    scan("during-spare")
    scan("during-own-child", extra=with_secret, env={"_FSEC_API_TOKEN": "its-own"})
    scan("during-inprocess", isolation="inprocess")
    assert s.get(holder_id)[1]["state"] == "running"  # the scans above ran while it did
    (tmp_path / "scratch-holder" / "release").touch()
    assert s.wait_done(holder_id)["result"]["outcome"] == "success"
    scan("after-spare")
    scan("after-own-child", extra=with_secret, env={"_FSEC_API_TOKEN": "its-own"})
    names = ("during-spare", "during-own-child", "during-inprocess", "after-spare", "after-own-child")
    assert {name: output_value(tmp_path, name)["found"] for name in names} == {name: [] for name in names}


def test_a_retry_forked_while_others_run_finds_none_of_them(server, tmp_path):
    # A retry of an invocation with secrets gets a child forked for it by the fork server's tick of
    # every job: nothing of the other jobs (not even their ids) may be on the stack it inherits.
    s = server("--concurrency", "4")
    head, tail = "leak-91ab", "-3c5d7e0f"
    holder_id = f"holder-{head}{tail}"
    assert s.post(invocation(tmp_path, holder_id, "until_released", {"seconds": 120.0},
                             env=scratch_env(tmp_path, "holder")))[0] == 202
    wait_for(lambda: (tmp_path / "scratch-holder" / "started").exists(), what="the holder to start")
    secret = security_pb2.Secret(group="api", key="token", env_var="MY_TOKEN")
    with_secret = ["--task-template", str(_template(tmp_path / "t.pb", secrets=[secret], retries=1))]
    record = s.run(invocation(tmp_path, "retried", "find_marker_on_retry", {"head": head, "tail": tail}, extra=with_secret,
                              env={"_FSEC_API_TOKEN": "its-own", "EXECUTOR_RETRY_BASE_DELAY": "0.05",
                                   **scratch_env(tmp_path, "retried")}))
    assert s.get(holder_id)[1]["state"] == "running"
    (tmp_path / "scratch-holder" / "release").touch()
    assert record["result"]["attempts"] == 2, record["result"]
    assert output_value(tmp_path, "retried")["found"] == []


def test_an_in_process_runner_keeps_nothing_of_the_invocation_it_was_forked_for(server, tmp_path):
    # A runner is forked for the pool's first in-process invocation and then serves the next ones:
    # neither what it inherited (the fork server's stack at that moment) nor what it kept of running
    # it may hold that first invocation: its env, its secret, its id (its paths carry it).
    s = server("--concurrency", "1")
    head, tail = "leak-3b7d", "-90fa11c2"
    secret = security_pb2.Secret(group="api", key="token", env_var="MY_TOKEN")
    with_secret = ["--task-template", str(_template(tmp_path / "t.pb", secrets=[secret]))]
    first = s.run(invocation(tmp_path, f"first-{head}{tail}", "add", {"a": 1, "b": 2}, isolation="inprocess", extra=with_secret,
                             env={"FIRST_VALUE": head + tail + "-env", "_FSEC_API_TOKEN": head + tail + "-secret"}))
    assert first["result"]["outcome"] == "success"
    scan = s.run(invocation(tmp_path, "after-inprocess", "find_marker", {"head": head, "tail": tail}, isolation="inprocess"))
    assert scan["worker_pid"] == first["worker_pid"]  # the same runner
    assert output_value(tmp_path, "after-inprocess")["found"] == []


def test_a_spare_keeps_nothing_of_the_invocation_it_rehearsed(server, tmp_path):
    # Spares are forked ahead of need and walk the code of the invocation launched last; the next
    # invocation runs in one. That earlier invocation's id and paths (its id is in them) must not be
    # found there.
    s = server("--concurrency", "2")
    head, tail = "leak-5d2e", "-77aa01bc"
    for i in range(3):  # the pool warm, the zygote up
        s.run(invocation(tmp_path, f"warm{i}", "add", {"a": 1, "b": 2}))
    earlier = f"earlier-{head}{tail}"
    assert s.run(invocation(tmp_path, earlier, "add", {"a": 1, "b": 2}))["result"]["outcome"] == "success"

    def spares() -> list:  # the zygote's children: the fork server's only child with children of its own
        import psutil

        (forkserver,) = psutil.Process(s.proc.pid).children()
        zygotes = [p for p in forkserver.children() if p.children()]
        return zygotes[0].children() if len(zygotes) == 1 else []

    # The spare made after `earlier` took one: the newest, the one the scan gets, rehearsed `earlier`.
    wait_for(lambda: len(spares()) == 2, what="the spares to be refilled")
    time.sleep(0.2)  # the fork server has heard of it
    s.run(invocation(tmp_path, "scan", "find_marker", {"head": head, "tail": tail}))
    assert output_value(tmp_path, "scan")["found"] == []


def test_template_env_applies_to_its_invocation_only(server, tmp_path):
    s = server()
    template = ["--task-template", str(_template(tmp_path / "t.pb", env={"FROM_TEMPLATE": "yes"}))]
    s.run(invocation(tmp_path, "templated", "env_of", {"names": "FROM_TEMPLATE"}, extra=template))
    s.run(invocation(tmp_path, "plain", "env_of", {"names": "FROM_TEMPLATE"}))
    assert output_value(tmp_path, "templated")["values"] == {"FROM_TEMPLATE": "yes"}
    assert output_value(tmp_path, "plain")["values"] == {"FROM_TEMPLATE": "<unset>"}


@pytest.mark.parametrize("isolation", ["fork", "inprocess"])
def test_template_env_equal_to_the_invocations_own_never_reaches_later_children(server, tmp_path, isolation):
    """The TaskTemplate sets a variable to the value the invocation already gave it: the spec phase
    (in the fork server) puts it into the C-level environment all the same, and it must go again, or
    every process forked after it (runners, and the programs tasks start) would inherit it."""
    s = server("--concurrency", "1")
    template = ["--task-template", str(_template(tmp_path / "t.pb", env={"SAME_VALUE": "given"}))]
    given = s.run(invocation(tmp_path, "given", "env_of_a_child", {"names": "SAME_VALUE"}, env={"SAME_VALUE": "given"},
                             extra=template, isolation=isolation))
    assert given["result"]["outcome"] == "success"
    assert output_value(tmp_path, "given")["values"] == {"SAME_VALUE": "given"}
    for i in range(3):  # whichever runner or spare each comes to, forked before or after `given`
        s.run(invocation(tmp_path, f"later-{i}", "env_of_a_child", {"names": "SAME_VALUE"}, isolation=isolation))
        assert output_value(tmp_path, f"later-{i}")["values"] == {"SAME_VALUE": "<unset>"}, i


def test_async_task_in_process(server, tmp_path):
    s = server()
    record = s.run(invocation(tmp_path, "async", "async_add", {"a": 2, "b": 3}, isolation="inprocess"))
    assert record["isolation"] == "inprocess" and output_value(tmp_path, "async") == 5


def test_an_in_process_success_is_answered_by_the_runner_itself(server, tmp_path):
    """The runner tells the server of a success directly: the answer does not wait for the fork server,
    which is frozen here while the task runs, and its own late report is not counted twice."""
    s = server()
    assert s.run(invocation(tmp_path, "warm", "add", {"a": 1, "b": 2}, isolation="inprocess"))["result"]["outcome"] == "success"
    body = invocation(tmp_path, "direct", "sleepy", {"seconds": 1.0}, env=scratch_env(tmp_path, "direct"), isolation="inprocess")
    assert s.post(body)[0] == 202
    runner_pid = int(wait_for(lambda: (tmp_path / "scratch-direct" / "started").exists() and
                              (tmp_path / "scratch-direct" / "started").read_text(), what="the task"))
    import psutil

    forkserver = psutil.Process(runner_pid).ppid()
    os.kill(forkserver, signal.SIGSTOP)
    try:
        record = s.wait_done("direct", timeout=30)
    finally:
        os.kill(forkserver, signal.SIGCONT)
    assert record["result"]["outcome"] == "success" and record["worker_pid"] == runner_pid
    assert record["result"]["attempts"] == 1 and "run" in record["result"]["phases_ms"]
    assert output_value(tmp_path, "direct") == 1.0 and out_files(tmp_path, "direct") == ["outputs.pb"]
    after = s.run(invocation(tmp_path, "after", "add", {"a": 2, "b": 2}, isolation="inprocess"))
    assert after["result"]["outcome"] == "success" and after["worker_pid"] == runner_pid  # the same runner, free again
    assert s.metric("executor_serve_invocations_total", outcome="success", code="") == 3


def test_in_process_invocations_after_the_first_go_straight_to_a_leased_runner(server, tmp_path):
    """Once its runner is idle the fork server lends it to the server, which writes the next in-process
    invocation straight into it; the runner prepares it itself (TaskTemplate env, secrets), and a spec
    failure prepared there still ends with exactly one error document."""
    s = server("--concurrency", "1")
    secret = security_pb2.Secret(group="api", key="token", env_var="MY_TOKEN")
    template = ["--task-template", str(_template(tmp_path / "t.pb", secrets=[secret], env={"FROM_TEMPLATE": "yes"}))]
    runner = s.run(invocation(tmp_path, "first", "add", {"a": 1, "b": 2}, isolation="inprocess"))["worker_pid"]
    assert s.metric("executor_serve_inprocess_dispatch_total", path="worker") == 1
    for i in range(3):
        wait_for(lambda: s.metric("executor_serve_leased_runners") == 1, what="the runner lent to the server")
        record = s.run(invocation(tmp_path, f"leased-{i}", "env_of", {"names": "FROM_TEMPLATE,MY_TOKEN,TMPDIR"},
                                  env={"_FSEC_API_TOKEN": f"{SECRET}-{i}"}, isolation="inprocess", extra=template))
        assert record["result"]["outcome"] == "success" and record["worker_pid"] == runner
        values = output_value(tmp_path, f"leased-{i}")["values"]
        assert values["FROM_TEMPLATE"] == "yes" and values["MY_TOKEN"] == f"{SECRET}-{i}"
        assert values["TMPDIR"].startswith(str(tmp_path)) and values["TMPDIR"].endswith("/tmp")  # its own, made for the lease
    assert s.metric("executor_serve_inprocess_dispatch_total", path="leased") == 3
    wait_for(lambda: s.metric("executor_serve_leased_runners") == 1, what="the runner lent again")
    missing = s.run(invocation(tmp_path, "missing", "env_of", {"names": "MY_TOKEN"}, isolation="inprocess", extra=template))
    assert missing["result"]["error"]["code"] == "SECRET_MISSING" and missing["result"]["error"]["phase"] == "spec"
    assert out_files(tmp_path, "missing") == ["error.pb"] and error_doc(tmp_path, "missing").code == "SECRET_MISSING"
    assert s.metric("executor_serve_inprocess_dispatch_total", path="leased") == 4
    wait_for(lambda: s.metric("executor_serve_leased_runners") == 1, what="the runner lent after the failure")
    after = s.run(invocation(tmp_path, "after", "add", {"a": 2, "b": 2}, isolation="inprocess"))
    assert after["worker_pid"] == runner and output_value(tmp_path, "after") == 4
    # Larger than the runner's pipe takes at once: never written under the server's lock but sent the usual
    # way, whose fork server takes the lease back (a reclaim) rather than fork a second runner.
    wait_for(lambda: s.metric("executor_serve_leased_runners") == 1, what="the runner lent again")
    large = s.run(invocation(tmp_path, "large", "env_of", {"names": "BIG"}, env={"BIG": "x" * (80 << 10)},
                             isolation="inprocess"))
    assert large["worker_pid"] == runner and output_value(tmp_path, "large")["values"]["BIG"] == "x" * (80 << 10)
    assert s.metric("executor_serve_inprocess_dispatch_total", path="leased") == 5
    assert s.metric("executor_serve_inprocess_dispatch_total", path="worker") == 2



def _sched_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def _states(pid: int, samples: int = 10) -> set[str]:
    seen = set()
    for _ in range(samples):
        seen.add(_sched_state(pid))
        time.sleep(0.02)
    return seen


def test_an_idle_in_process_runner_polls_for_its_next_invocation_only_as_long_as_told(server, tmp_path):
    """--runner-spin-us: after an attempt an in-process runner polls its job pipe (runnable all along),
    reads an invocation that comes meanwhile, and sleeps on the pipe once the time is up."""
    spinning = server("--concurrency", "1", "--runner-spin-us", "60000000")
    runner = spinning.run(invocation(tmp_path, "first", "add", {"a": 1, "b": 2}, isolation="inprocess"))["worker_pid"]
    assert _states(runner) == {"R"}  # polling, not asleep
    wait_for(lambda: spinning.metric("executor_serve_leased_runners") == 1, what="the runner lent to the server")
    record = spinning.run(invocation(tmp_path, "during", "add", {"a": 2, "b": 3}, isolation="inprocess"))
    assert record["worker_pid"] == runner and output_value(tmp_path, "during") == 5
    spinning.kill()

    brief = server("--concurrency", "1", "--runner-spin-us", "50000")
    runner = brief.run(invocation(tmp_path, "brief", "add", {"a": 1, "b": 1}, isolation="inprocess"))["worker_pid"]
    wait_for(lambda: _sched_state(runner) == "S", what="the runner asleep once its 50 ms are up")
    assert _states(runner) == {"S"}
    assert brief.run(invocation(tmp_path, "woken", "add", {"a": 3, "b": 3}, isolation="inprocess"))["worker_pid"] == runner
    assert output_value(tmp_path, "woken") == 6


def test_await_job_returns_when_there_is_input_or_the_time_is_up():
    from executor.serve.runner import await_job

    r, w = os.pipe()
    try:
        started = time.monotonic()
        assert await_job(r, 0.05) is False and time.monotonic() - started >= 0.05
        os.write(w, b"x")
        assert await_job(r, 60) is True  # already there
        os.read(r, 1)
        threading.Timer(0.05, os.write, (w, b"y")).start()
        started = time.monotonic()
        assert await_job(r, 60) is True and time.monotonic() - started < 30  # came meanwhile
        os.read(r, 1)
        os.close(w)
        w = -1
        assert await_job(r, 60) is True  # the end of input (a retiring runner): nothing to wait for
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@pytest.mark.parametrize("cancel", [False, True])
def test_an_invocation_is_held_for_the_lease_of_the_runner_that_just_answered(server, tmp_path, cancel):
    """A runner that answered the server itself is lent again before its fork server reports the attempt.
    An in-process invocation arriving in between is held for that lease rather than sent through the fork
    server (frozen here), which would have to ask for the lease back; once the lease comes it goes straight
    to that runner. Cancelled while held, it never runs: PREEMPTED, with exactly one error.pb."""
    s = server("--concurrency", "1")
    runner = s.run(invocation(tmp_path, "first", "add", {"a": 1, "b": 2}, isolation="inprocess"))["worker_pid"]
    wait_for(lambda: s.metric("executor_serve_leased_runners") == 1, what="the runner lent to the server")
    import psutil

    forkserver = psutil.Process(runner).ppid()
    os.kill(forkserver, signal.SIGSTOP)
    try:
        answered = s.run(invocation(tmp_path, "answered", "add", {"a": 2, "b": 2}, isolation="inprocess"), timeout=30)
        assert answered["result"]["outcome"] == "success" and answered["worker_pid"] == runner
        held = invocation(tmp_path, "held", "env_of", {"names": "HELD"}, env={"HELD": "ran"}, isolation="inprocess")
        assert s.post(held)[0] == 202
        time.sleep(0.3)
        assert s.get("held")[1]["state"] == "running"
        assert s.metric("executor_serve_inprocess_dispatch_total", path="worker") == 1  # only "first": held, not sent
        if cancel:
            assert s.request("DELETE", "/invocations/held")[0] == 202
    finally:
        os.kill(forkserver, signal.SIGCONT)
    record = s.wait_done("held", timeout=30)
    if cancel:
        assert record["result"]["error"]["code"] == "PREEMPTED" and "before it started" in record["result"]["error"]["message"]
        assert out_files(tmp_path, "held") == ["error.pb"]
        assert s.metric("executor_serve_inprocess_dispatch_total", path="leased") == 1
    else:
        assert record["result"]["outcome"] == "success" and record["worker_pid"] == runner
        assert output_value(tmp_path, "held")["values"] == {"HELD": "ran"} and out_files(tmp_path, "held") == ["outputs.pb"]
        assert s.metric("executor_serve_inprocess_dispatch_total", path="leased") == 2
    assert s.metric("executor_serve_inprocess_dispatch_total", path="worker") == 1
    after = s.run(invocation(tmp_path, "after", "add", {"a": 3, "b": 3}, isolation="inprocess"))
    assert after["worker_pid"] == runner and output_value(tmp_path, "after") == 6


_DROPPED_DESCRIPTOR = """
import os, resource, select
from executor.serve.channel import Channel, frame, pair
ours, fd = pair()
theirs = Channel.from_fd(fd)
r, w = os.pipe()
pad = 60000
pad += (1 << 16) - 6 - len(frame({"event": "pad", "pad": "a" * pad}))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
fillers = []
try:
    while True:
        fillers.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
theirs.send({"event": "pad", "pad": "a" * pad})
theirs.send_with_fd({"event": "lease", "pid": 1}, w)  # the first read ends 6 bytes into it, with its descriptor
select.select([ours.sock], [], [])
got = ours.pump()
os.close(fillers.pop())
theirs.send_with_fd({"event": "lease", "pid": 2}, r)
while len(got) < 3:
    select.select([ours.sock], [], [])
    got += ours.pump()
print([(m.get("pid"), m.get("fd")) for m in got])
"""


def test_a_lease_whose_descriptor_the_kernel_dropped_is_never_paired_with_another(tmp_path):
    """Out of descriptors, the kernel drops the one sent with a lease (MSG_CTRUNC) but delivers its
    frame; when that frame is completed by the read that brings the next lease's descriptor, the next
    descriptor must stay with its own lease (the first gets -1: the server gives it back)."""
    out = subprocess.run([sys.executable, "-c", _DROPPED_DESCRIPTOR], cwd=REPO, env=env_with(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import ast

    (_, _), (first_pid, first_fd), (second_pid, second_fd) = ast.literal_eval(out.stdout)
    assert (first_pid, first_fd) == (1, -1) and second_pid == 2 and second_fd >= 0


@pytest.mark.parametrize("wait_for_revoke", [True, False])
def test_a_leased_runner_that_dies_idle_costs_no_invocation(server, tmp_path, wait_for_revoke):
    """Killed while lent to the server: its lease is revoked once the fork server reaps it, and an
    invocation sent before that (into a pipe nobody reads any more) goes the usual way instead."""
    s = server("--concurrency", "1")
    runner = s.run(invocation(tmp_path, "first", "add", {"a": 1, "b": 2}, isolation="inprocess"))["worker_pid"]
    wait_for(lambda: s.metric("executor_serve_leased_runners") == 1, what="the runner lent to the server")
    os.kill(runner, signal.SIGKILL)
    wait_for(lambda: not alive(runner), what="the runner to be gone")
    if wait_for_revoke:
        wait_for(lambda: s.metric("executor_serve_leased_runners") == 0, what="the lease revoked")
    record = s.run(invocation(tmp_path, "next", "add", {"a": 2, "b": 3}, isolation="inprocess"))
    assert record["result"]["outcome"] == "success" and output_value(tmp_path, "next") == 5
    assert record["worker_pid"] != runner and out_files(tmp_path, "next") == ["outputs.pb"]
    assert s.metric("executor_serve_inprocess_dispatch_total", path="leased") == 0


@pytest.mark.parametrize("isolation", ["inprocess", "fork"])
def test_forged_direct_results_are_ignored(server, tmp_path, isolation):
    """Task code in an in-process runner can reach the results socket; what it sends for another
    invocation, or without the server's token, changes nothing. An isolated child never holds it."""
    s = server("--concurrency", "2")
    victim = invocation(tmp_path, "victim", "sleepy", {"seconds": 1.5}, env=scratch_env(tmp_path, "victim"), isolation="inprocess")
    assert s.post(victim)[0] == 202
    wait_for(lambda: (tmp_path / "scratch-victim" / "started").exists(), what="the victim to start")
    forger = s.run(invocation(tmp_path, "forger", "forge_results", {"x": 100}, env={"VICTIM": "victim", "SELF": "forger"},
                              isolation=isolation))
    sockets_found = output_value(tmp_path, "forger") - 100
    assert sockets_found == (1 if isolation == "inprocess" else 0)
    assert forger["result"]["task"] != "forged" and forger["result"]["files"] != ["forged"]
    record = s.wait_done("victim")
    assert record["result"]["task"] != "forged" and record["result"]["files"] != ["forged"]
    assert output_value(tmp_path, "victim") == 1.5
    # Messages of the wrong shape were dropped: the same warm worker serves on.
    after = s.run(invocation(tmp_path, "after", "add", {"a": 1, "b": 2}, isolation="inprocess"))
    assert after["result"]["outcome"] == "success"
    log = s.log()
    assert "Traceback" not in log and "exited unexpectedly" not in log and s.metric("executor_serve_workers") == 1


def test_server_default_isolation_flag(server, tmp_path):
    s = server("--isolation", "inprocess", "--concurrency", "1")
    pids = {s.run(invocation(tmp_path, f"p{i}", "pid", {"x": i}))["isolation"] for i in range(2)}
    assert pids == {"inprocess"}
    assert output_value(tmp_path, "p0") == output_value(tmp_path, "p1")  # the same warm runner


# --- runtime controls ---------------------------------------------------------------------------


def test_timeout_is_enforced_and_explained(server, tmp_path):
    s = server("--concurrency", "2")
    slow = invocation(tmp_path, "slow", "sleepy", {"seconds": 300.0},
                      env={**scratch_env(tmp_path, "slow"), "EXECUTOR_TIMEOUT_SECONDS": "1", "EXECUTOR_GRACE_SECONDS": "2"})
    fine = invocation(tmp_path, "fine", "add", {"a": 1, "b": 2})
    assert s.post(slow)[0] == 202
    s.run(fine)
    record = s.wait_done("slow")
    assert record["result"]["error"]["code"] == "TIMEOUT"
    error = error_doc(tmp_path, "slow")
    assert "timeout of 1 s" in error.message and "in sleepy" in error.message  # the user's frame from the stack dump
    assert not alive(int((tmp_path / "scratch-slow" / "started").read_text()))
    assert out_files(tmp_path, "fine") == ["outputs.pb"]


@pytest.mark.parametrize("isolation", ["fork", "inprocess"])
def test_cancel_a_running_invocation(server, tmp_path, isolation):
    s = server()
    body = invocation(tmp_path, "victim", "stubborn", {"seconds": 300.0}, isolation=isolation,
                      env={**scratch_env(tmp_path, "victim"), "EXECUTOR_GRACE_SECONDS": "1"})
    assert s.post(body)[0] == 202
    started = wait_for(lambda: (tmp_path / "scratch-victim" / "started").exists() and
                       (tmp_path / "scratch-victim" / "started").read_text(), what="the task to start")
    status, cancelling = s.request("DELETE", "/invocations/victim")[:2]
    assert status == 202 and cancelling["cancel_requested"] is True
    record = s.wait_done("victim")
    assert record["result"]["error"]["code"] == "PREEMPTED" and "cancelled" in record["result"]["error"]["message"]
    assert out_files(tmp_path, "victim") == ["error.pb"] and error_doc(tmp_path, "victim").kind == 1
    assert not alive(int(started))  # SIGTERM ignored: killed after the grace period
    assert s.request("DELETE", "/invocations/victim")[0] == 409
    assert s.run(invocation(tmp_path, "after", "add", {"a": 1, "b": 1}, isolation=isolation))["result"]["outcome"] == "success"


def test_cancel_a_queued_invocation(server, tmp_path):
    s = server("--concurrency", "1")
    blocker = invocation(tmp_path, "blocker", "sleepy", {"seconds": 300.0}, env=scratch_env(tmp_path, "blocker"))
    queued = invocation(tmp_path, "queued", "record_run", {"x": 1}, env=scratch_env(tmp_path, "queued"))
    assert s.post(blocker)[0] == 202
    status, record = s.post(queued)
    assert status == 202 and record["state"] == "queued"
    assert s.request("DELETE", "/invocations/queued")[0] == 202
    record = s.wait_done("queued")
    assert record["result"]["error"]["code"] == "PREEMPTED" and "before it started" in record["result"]["error"]["message"]
    assert out_files(tmp_path, "queued") == ["error.pb"]
    assert not (tmp_path / "scratch-queued" / "runs").exists()
    assert s.get("blocker")[1]["state"] == "running"  # untouched
    assert s.request("DELETE", "/invocations/blocker")[0] == 202
    assert s.wait_done("blocker")["result"]["error"]["code"] == "PREEMPTED"


def test_busy_answer_beyond_the_backlog(server, tmp_path):
    s = server("--concurrency", "1", "--backlog", "1")
    first = invocation(tmp_path, "first", "sleepy", {"seconds": 300.0}, env=scratch_env(tmp_path, "first"))
    second = invocation(tmp_path, "second", "add", {"a": 1, "b": 1})
    third = invocation(tmp_path, "third", "add", {"a": 2, "b": 2})
    assert s.post(first)[0] == 202
    assert s.post(second)[1]["state"] == "queued"
    status, content, headers = s.request("POST", "/invocations", third)
    assert status == 429 and content["error"] == "busy" and "--backlog 1" in content["reason"]
    assert headers["Retry-After"] == "1"
    assert s.metric("executor_serve_rejected_total", reason="busy") == 1
    assert s.metric("executor_serve_queued") == 1 and s.metric("executor_serve_in_flight") == 1
    assert s.request("DELETE", "/invocations/first")[0] == 202
    assert s.wait_done("second")["result"]["outcome"] == "success"
    assert s.get("third")[0] == 404  # refused means not remembered: the caller may retry the same id
    assert s.run(third)["result"]["outcome"] == "success"


def test_oom_and_native_crash_are_classified(server, tmp_path):
    s = server("--concurrency", "2")
    s.run(invocation(tmp_path, "oom", "killed_by_kernel", {"x": 1}))
    s.run(invocation(tmp_path, "crash", "segfault", {"x": 1}))
    oom, crash = error_doc(tmp_path, "oom"), error_doc(tmp_path, "crash")
    assert oom.code == "OOM" and "SIGKILL" in oom.message
    assert crash.code == "USER" and "SIGSEGV" in crash.message
    # an in-process runner that crashes is replaced; the next invocation gets a fresh one
    s.run(invocation(tmp_path, "crash-inproc", "segfault", {"x": 1}, isolation="inprocess"))
    assert error_doc(tmp_path, "crash-inproc").code == "USER"
    assert s.run(invocation(tmp_path, "next", "add", {"a": 2, "b": 2}, isolation="inprocess"))["result"]["outcome"] == "success"


def test_local_checkpoint_is_uploaded_after_a_timeout(server, tmp_path):
    s = server()
    ckpt = tmp_path / "ckpt"
    body = invocation(tmp_path, "ckpt", "saves_locally_then_sleeps", {"seconds": 300}, module="tests.sample_tasks.runtime",
                      env={**scratch_env(tmp_path, "ckpt"), "EXECUTOR_TIMEOUT_SECONDS": "1", "EXECUTOR_GRACE_SECONDS": "1"},
                      extra=["--checkpoint-path", str(ckpt)])
    record = s.run(body)
    assert record["result"]["error"]["code"] == "TIMEOUT"
    assert (ckpt / "state.txt").read_text() == "halfway"


def test_recoverable_failures_are_retried_in_place(server, tmp_path):
    s = server()
    record = s.run(invocation(tmp_path, "flaky", "flaky", {"failures": 2},
                              env={**scratch_env(tmp_path, "flaky"), "EXECUTOR_RETRIES": "2", "EXECUTOR_RETRY_BASE_DELAY": "0.05"}))
    assert record["result"]["outcome"] == "success" and record["result"]["attempts"] == 3
    assert output_value(tmp_path, "flaky") == 3 and out_files(tmp_path, "flaky") == ["outputs.pb"]


# --- pools and workers ----------------------------------------------------------------------------


def _bundle(tmp_path: Path, name: str, answer: int) -> str:
    src = tmp_path / f"src-{name}"
    (src / "bundled").mkdir(parents=True)
    (src / "bundled" / "__init__.py").write_text("")
    (src / "bundled" / "tasks.py").write_text(f"def answer(x: int) -> int:\n    return x + {answer}\n")
    proc = subprocess.run([sys.executable, "-m", "executor", "bundle", "build", str(src), str(tmp_path / f"b-{name}")],
                          env=env_with(), cwd=str(REPO), capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def _fast(tmp_path: Path, name: str, bundle: str, x: int, env: dict | None = None) -> dict:
    body = invocation(tmp_path, name, "answer", {"x": x}, module="bundled.tasks", env=env)
    body["argv"] = ["pyflyte-fast-execute", "--additional-distribution", bundle, "--dest-dir", str(tmp_path / name / "dest"),
                    "--", *body["argv"]]
    return body


def test_one_warm_pool_per_bundle_least_recently_used_retired(server, tmp_path):
    one, two = _bundle(tmp_path, "one", 100), _bundle(tmp_path, "two", 200)
    cache = {"EXECUTOR_CACHE_DIR": str(tmp_path / "cache")}
    s = server("--max-pools", "1", env=cache)
    assert s.run(_fast(tmp_path, "one-a", one, 1, env=cache))["pool"].endswith(":bundled.tasks")
    s.run(_fast(tmp_path, "one-b", one, 2, env=cache))
    s.run(_fast(tmp_path, "two-a", two, 3, env=cache))
    s.run(_fast(tmp_path, "one-c", one, 4, env=cache))
    assert [output_value(tmp_path, n) for n in ("one-a", "one-b", "two-a", "one-c")] == [101, 102, 203, 104]
    assert s.metric("executor_serve_pool_requests_total", result="hit") == 1
    assert s.metric("executor_serve_pool_requests_total", result="miss") == 3
    assert s.metric("executor_serve_worker_recycles_total", reason="lru") == 2
    assert s.metric("executor_serve_bundle_cache_total", result="miss") == 2  # "one" came from the node cache the 2nd time
    assert s.metric("executor_serve_bundle_cache_total", result="hit") == 1
    assert s.metric("executor_serve_pools") == 1


def test_a_new_pool_is_kept_while_every_older_one_is_busy(server, tmp_path):
    # Above --max-pools with the only other pool busy: nothing can be retired yet, least of all the
    # pool just made for the invocation at hand; it serves the next ones warm. Once the busy pool is
    # idle, it is the one retired.
    one = _bundle(tmp_path, "one", 100)
    cache = {"EXECUTOR_CACHE_DIR": str(tmp_path / "cache")}
    s = server("--max-pools", "1", "--concurrency", "3", env=cache)
    busy = invocation(tmp_path, "busy", "until_released", {"seconds": 120.0}, env=scratch_env(tmp_path, "busy"))
    assert s.post(busy)[0] == 202
    wait_for(lambda: (tmp_path / "scratch-busy" / "started").exists(), what="the busy pool's task to start")
    pools = {s.run(_fast(tmp_path, f"one-{i}", one, i, env=cache))["pool"] for i in range(3)}
    assert [output_value(tmp_path, f"one-{i}") for i in range(3)] == [100, 101, 102] and len(pools) == 1
    assert s.metric("executor_serve_pool_requests_total", result="miss") == 2  # the busy pool's, then this one's
    assert s.metric("executor_serve_pool_requests_total", result="hit") == 2
    assert s.metric("executor_serve_worker_recycles_total", reason="lru") == 0
    (tmp_path / "scratch-busy" / "release").touch()
    assert s.wait_done("busy")["result"]["outcome"] == "success"
    wait_for(lambda: s.metric("executor_serve_worker_recycles_total", reason="lru") == 1, what="the idle pool retired")
    assert s.run(_fast(tmp_path, "one-3", one, 3, env=cache))["pool"] in pools
    assert s.metric("executor_serve_pool_requests_total", result="hit") == 3


def test_workers_are_replaced_after_k_invocations(server, tmp_path):
    s = server("--max-invocations-per-worker", "3", "--concurrency", "1")
    pools = set()
    for i in range(7):
        record = s.run(invocation(tmp_path, f"k{i}", "add", {"a": i, "b": 0}))
        assert record["result"]["outcome"] == "success"
        pools.add(record["pool"])
    assert [output_value(tmp_path, f"k{i}") for i in range(7)] == list(range(7))
    assert s.metric("executor_serve_worker_recycles_total", reason="max_invocations") == 2
    assert s.metric("executor_serve_pool_requests_total", result="miss") == 3
    assert len(pools) == 1


def test_in_process_runner_replaced_above_the_rss_ceiling(server, tmp_path):
    s = server("--max-worker-rss-mib", "150", "--concurrency", "1")
    first = s.run(invocation(tmp_path, "hog", "hog", {"megabytes": 200}, isolation="inprocess"))
    assert first["result"]["outcome"] == "success"
    s.run(invocation(tmp_path, "after", "pid", {"x": 1}, isolation="inprocess"))
    assert output_value(tmp_path, "after") != output_value(tmp_path, "hog")  # a fresh runner
    s.stop()
    assert "recycling an in-process runner" in s.log()


def test_fork_server_replaced_above_the_rss_ceiling(server, tmp_path):
    # A fork server reports its own resident memory with each finished invocation. The task module's
    # import-time ballast (module-level code runs in the fork server, with the server's env) puts it
    # above the ceiling: the isolated invocation that made it import the module retires it once done.
    s = server("--max-worker-rss-mib", "150", "--concurrency", "1", env={"SERVE_TASKS_BALLAST_MIB": "200"})
    first = s.run(invocation(tmp_path, "first", "session", {"x": 1}))
    assert first["result"]["outcome"] == "success" and first["isolation"] == "fork"
    first_server = output_value(tmp_path, "first")
    assert s.metric("executor_serve_worker_recycles_total", reason="rss") == 1
    assert s.metric("executor_serve_worker_recycles_total", reason="max_invocations") == 0
    wait_for(lambda: not alive(first_server), what="the retired fork server to exit")
    second = s.run(invocation(tmp_path, "second", "session", {"x": 2}))
    assert second["result"]["outcome"] == "success"
    assert output_value(tmp_path, "second") != first_server  # a fresh worker
    assert s.metric("executor_serve_pool_requests_total", result="miss") == 2
    assert s.metric("executor_serve_worker_recycles_total", reason="rss") == 2  # as large: retired as well
    s.stop()
    log = s.log()
    started = [int(p) for p in re.findall(r"warm worker started .*pid=(\d+)", log)]
    assert started == [first_server, output_value(tmp_path, "second")]  # the tasks saw their fork servers
    recycled = re.findall(r"recycling a warm worker .*reason=(\w+).*rss_mib=([\d.]+)", log)
    assert [reason for reason, _ in recycled] == ["rss", "rss"] and all(float(mib) > 150 for _, mib in recycled)


@pytest.mark.parametrize("kind", ["timeout", "oom"])
def test_an_in_process_timeout_or_oom_takes_its_runner_not_the_next_invocation(server, tmp_path, kind):
    s = server("--concurrency", "1")
    s.run(invocation(tmp_path, "before", "pid", {"x": 1}, isolation="inprocess"))
    runner = output_value(tmp_path, "before")
    if kind == "timeout":
        body = invocation(tmp_path, "victim", "sleepy", {"seconds": 300.0}, isolation="inprocess",
                          env={**scratch_env(tmp_path, "victim"), "EXECUTOR_TIMEOUT_SECONDS": "1",
                               "EXECUTOR_GRACE_SECONDS": "1"})
    else:  # as the isolated OOM test: a SIGKILL nobody here sent
        body = invocation(tmp_path, "victim", "killed_by_kernel", {"x": 1}, isolation="inprocess")
    record = s.run(body)
    assert record["isolation"] == "inprocess" and record["worker_pid"] == runner  # it ran in the warm runner
    error = error_doc(tmp_path, "victim")
    assert out_files(tmp_path, "victim") == ["error.pb"]
    assert record["result"]["error"]["code"] == error.code == {"timeout": "TIMEOUT", "oom": "OOM"}[kind]
    if kind == "timeout":
        assert "timeout of 1 s" in error.message and "in sleepy" in error.message  # the user's frame from the stack dump
        assert int((tmp_path / "scratch-victim" / "started").read_text()) == runner
    else:
        assert "SIGKILL" in error.message
    wait_for(lambda: not alive(runner), what="the runner to be gone")
    after = s.run(invocation(tmp_path, "after", "pid", {"x": 2}, isolation="inprocess"))
    assert after["result"]["outcome"] == "success" and out_files(tmp_path, "after") == ["outputs.pb"]
    assert output_value(tmp_path, "after") != runner  # a fresh runner
    again = s.run(invocation(tmp_path, "again", "pid", {"x": 3}, isolation="inprocess"))
    assert output_value(tmp_path, "again") == output_value(tmp_path, "after")  # and it stays warm


def test_server_exits_after_the_idle_ttl(server, tmp_path):
    s = server("--idle-ttl", "1")
    s.run(invocation(tmp_path, "only", "add", {"a": 1, "b": 1}))
    assert s.proc.wait(timeout=60) == 0
    assert "idle for the idle TTL" in s.log()
    assert not (tmp_path / "serve-work").exists()


def test_a_dead_worker_still_leaves_an_error_document(server, tmp_path):
    s = server()
    body = invocation(tmp_path, "orphaned", "sleepy", {"seconds": 300.0}, env=scratch_env(tmp_path, "orphaned"))
    assert s.post(body)[0] == 202
    task_pid = int(wait_for(lambda: (tmp_path / "scratch-orphaned" / "started").exists() and
                            (tmp_path / "scratch-orphaned" / "started").read_text(), what="the task"))
    forkserver = [p for p in descendants(s.proc.pid) if task_pid in descendants(p)][0]
    os.kill(forkserver, signal.SIGKILL)
    record = s.wait_done("orphaned")
    assert record["result"]["error"]["code"] == "SYSTEM" and "died" in record["result"]["error"]["message"]
    assert out_files(tmp_path, "orphaned") == ["error.pb"]
    wait_for(lambda: not alive(task_pid), what="the task to die with its worker")
    assert s.run(invocation(tmp_path, "next", "add", {"a": 1, "b": 1}))["result"]["outcome"] == "success"


@pytest.mark.parametrize("module, code, message", [
    ("crashes_at_import", "USER", "crashed with SIGSEGV while it imported tests.sample_tasks.crashes_at_import"),
    ("exits_at_import", "IMPORT", "failed to import: SystemExit: 3"),
    ("ends_process_at_import", "USER", "exited with code 3 while it imported tests.sample_tasks.ends_process_at_import"),
])
def test_a_module_that_kills_the_worker_as_it_is_imported_is_the_tasks_failure(server, tmp_path, module, code, message):
    # As on the one-shot path: a user error of phase load, not a lost worker for the backend to retry.
    s = server()
    for name in ("first", "second"):  # every invocation says so (each pool start tries the import again)
        body = invocation(tmp_path, name, "task", {"a": 1}, module=f"tests.sample_tasks.{module}")
        error = s.run(body)["result"]["error"]
        assert (error["code"], error["phase"], error["origin"]) == (code, "load", "USER"), error
        assert message in error["message"]
        assert out_files(tmp_path, name) == ["error.pb"] and error_doc(tmp_path, name).code == code
    assert s.run(invocation(tmp_path, "other", "add", {"a": 1, "b": 2}))["result"]["outcome"] == "success"


def test_nothing_outlives_a_killed_server(server, tmp_path):
    s = server("--concurrency", "2")
    for i in range(2):
        assert s.post(invocation(tmp_path, f"s{i}", "sleepy", {"seconds": 300.0}, env=scratch_env(tmp_path, f"s{i}"),
                                 isolation=["fork", "inprocess"][i]))[0] == 202
    for i in range(2):
        wait_for(lambda: (tmp_path / f"scratch-s{i}" / "started").exists(), what="the tasks to start")
    tree = descendants(s.proc.pid)
    assert len(tree) >= 3
    s.kill()
    wait_for(lambda: not any(alive(p) for p in tree), what="every worker and task to exit")
    for i in range(2):  # the fork server reported them before going: PREEMPTED, each with its error.pb
        assert error_doc(tmp_path, f"s{i}").code == "PREEMPTED"


# --- SIGTERM --------------------------------------------------------------------------------------


def test_sigterm_drains_running_work_and_preempts_the_queue(server, tmp_path):
    s = server("--concurrency", "1", "--grace", "60")
    running = invocation(tmp_path, "running", "sleepy", {"seconds": 4.0}, env=scratch_env(tmp_path, "running"))
    queued = invocation(tmp_path, "queued", "add", {"a": 1, "b": 1})
    assert s.post(running)[0] == 202
    assert s.post(queued)[1]["state"] == "queued"
    wait_for(lambda: (tmp_path / "scratch-running" / "started").exists(), what="the task to start")
    s.signal(signal.SIGTERM)
    wait_for(lambda: s.request("GET", "/readyz")[0] == 503, what="readyz to fail")
    status, refused, _ = s.request("POST", "/invocations", invocation(tmp_path, "late", "add", {"a": 1, "b": 1}))
    assert status == 503 and refused["error"] == "draining"
    assert s.proc.wait(timeout=60) == 0
    assert output_value(tmp_path, "running") == 4.0  # drained: it finished
    assert error_doc(tmp_path, "queued").code == "PREEMPTED" and out_files(tmp_path, "queued") == ["error.pb"]
    assert out_files(tmp_path, "late") == []


def test_sigterm_preempts_what_outlasts_the_grace_period(server, tmp_path):
    s = server("--concurrency", "2", "--grace", "10")
    for name in ("a", "b"):
        assert s.post(invocation(tmp_path, name, "stubborn", {"seconds": 300.0}, env=scratch_env(tmp_path, name),
                                 isolation="fork" if name == "a" else "inprocess"))[0] == 202
    pids = [int(wait_for(lambda n=n: (tmp_path / f"scratch-{n}" / "started").exists() and
                         (tmp_path / f"scratch-{n}" / "started").read_text(), what="the tasks")) for n in ("a", "b")]
    s.signal(signal.SIGTERM)
    assert s.proc.wait(timeout=60) == 0
    for name in ("a", "b"):
        error = error_doc(tmp_path, name)
        assert error.code == "PREEMPTED" and "SIGTERM" in error.message and out_files(tmp_path, name) == ["error.pb"]
    assert not any(alive(p) for p in pids)


def test_a_second_sigterm_stops_what_runs_at_once(server, tmp_path):
    # The grace period is far longer than the test may take: only the second SIGTERM can end it in time.
    s = server("--concurrency", "2", "--grace", "600")
    for name in ("a", "b"):  # both ignore SIGTERM: they are SIGKILLed half a stop window later
        assert s.post(invocation(tmp_path, name, "stubborn", {"seconds": 300.0}, env=scratch_env(tmp_path, name),
                                 isolation="fork" if name == "a" else "inprocess"))[0] == 202
    assert s.post(invocation(tmp_path, "queued", "add", {"a": 1, "b": 1}))[1]["state"] == "queued"
    pids = [int(wait_for(lambda n=n: (tmp_path / f"scratch-{n}" / "started").exists() and
                         (tmp_path / f"scratch-{n}" / "started").read_text(), what="the tasks")) for n in ("a", "b")]
    s.signal(signal.SIGTERM)
    wait_for(lambda: s.request("GET", "/readyz")[0] == 503, what="the drain to begin")
    queued = s.wait_done("queued")["result"]["error"]
    assert queued["code"] == "PREEMPTED" and "before it started" in queued["message"]
    assert [s.get(n)[1]["state"] for n in ("a", "b")] == ["running", "running"]  # the drain lets them run
    s.signal(signal.SIGTERM)
    assert s.proc.wait(timeout=120) == 0  # every invocation reported
    for name in ("a", "b"):
        error = error_doc(tmp_path, name)
        assert error.code == "PREEMPTED" and "asked to stop (SIGTERM)" in error.message, error.message
        assert out_files(tmp_path, name) == ["error.pb"]
    assert out_files(tmp_path, "queued") == ["error.pb"] and error_doc(tmp_path, "queued").code == "PREEMPTED"
    assert not any(alive(p) for p in pids)
    log = s.log()
    assert "stopping what still runs" in log and "invocations unreported" not in log


def test_a_flood_of_signals_during_the_drain_never_hangs_the_server(server, tmp_path):
    """Signals arrive at any instant of the main loop, also while it holds a lock of its own: the
    handler must take none (a threading.Event set from it deadlocked the server now and then)."""
    s = server("--concurrency", "1", "--grace", "600")
    assert s.post(invocation(tmp_path, "a", "stubborn", {"seconds": 300.0}, env=scratch_env(tmp_path, "a")))[0] == 202
    wait_for(lambda: (tmp_path / "scratch-a" / "started").exists(), what="the task to start")
    sent, until = 0, time.monotonic() + 3  # the second signal stops the task: SIGKILLed half a stop window later
    while time.monotonic() < until and s.proc.poll() is None:
        try:
            os.kill(s.proc.pid, (signal.SIGTERM, signal.SIGINT)[sent % 2])
        except ProcessLookupError:
            break
        sent += 1
    try:
        code = s.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server hung after {sent} signals") from None
    assert code == 0 and sent > 100, (code, sent, s.log()[-3000:])
    error = error_doc(tmp_path, "a")
    assert error.code == "PREEMPTED" and out_files(tmp_path, "a") == ["error.pb"]


# --- JSON lines ----------------------------------------------------------------------------------


def test_json_lines_on_stdin_and_stdout(server, tmp_path):
    s = server(stdio=True)
    requests = [
        invocation(tmp_path, "j1", "add", {"a": 3, "b": 4}),
        invocation(tmp_path, "j2", "prints", {"x": 5}),
        {"op": "invoke", **invocation(tmp_path, "j3", "fail", {"x": 1})},
        {"id": "bad", "argv": ["nonsense"]},
    ]
    out, err = s.proc.communicate("\n".join(json.dumps(r) for r in requests) + "\n", timeout=120)
    assert s.proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]  # every line is the protocol: no task output
    by = {(e.get("id"), e["event"]) for e in events}
    assert {("j1", "accepted"), ("j2", "accepted"), ("j3", "accepted"), ("bad", "rejected")} <= by
    finished = {e["id"]: e for e in events if e["event"] == "finished"}
    assert set(finished) == {"j1", "j2", "j3"}
    assert finished["j1"]["result"]["outcome"] == "success" and output_value(tmp_path, "j1") == 7
    assert finished["j3"]["result"]["error"]["code"] == "USER"
    assert "a line on the task's stdout" in s.log()


def test_json_lines_get_cancel_and_metrics(server, tmp_path):
    s = server(stdio=True)
    slow = invocation(tmp_path, "j-slow", "stubborn", {"seconds": 300.0},
                      env={**scratch_env(tmp_path, "j-slow"), "EXECUTOR_GRACE_SECONDS": "1"})
    s.send({"op": "invoke", **slow})
    assert s.event(event="accepted", id="j-slow")["status"] == 202
    s.send(invocation(tmp_path, "j-add", "add", {"a": 20, "b": 22}))
    assert s.event(event="accepted", id="j-add")["status"] == 202
    assert s.event(event="finished", id="j-add")["result"]["outcome"] == "success"

    s.send({"op": "get", "id": "j-add"})  # a finished one: its whole record
    status = s.event(event="status", id="j-add")
    assert status["status"] == 200 and status["state"] == "done" and status["result"]["outcome"] == "success"
    assert status["result"]["files"] == [str(tmp_path / "j-add" / "out" / "outputs.pb")] and output_value(tmp_path, "j-add") == 42
    s.send({"op": "get", "id": "j-nope"})
    assert s.event(event="status", id="j-nope")["status"] == 404  # it names the id it answers

    started = wait_for(lambda: (tmp_path / "scratch-j-slow" / "started").exists() and
                       (tmp_path / "scratch-j-slow" / "started").read_text(), what="the task to start")
    s.send({"op": "get", "id": "j-slow"})
    status = s.event(event="status", id="j-slow")
    assert status["status"] == 200 and status["state"] == "running" and status.get("result") is None

    s.send({"op": "metrics"})
    text = s.event(event="metrics")["text"]
    assert "# TYPE executor_serve_in_flight gauge" in text
    assert metric_sample(text, "executor_serve_in_flight") == 1
    assert metric_sample(text, "executor_serve_invocations_total", outcome="success", code="") == 1

    s.send({"op": "cancel", "id": "j-slow"})  # running, ignores SIGTERM: killed after its grace period
    cancelling = s.event(event="cancel", id="j-slow")
    assert cancelling["status"] == 202 and cancelling["cancel_requested"] is True
    finished = s.event(event="finished", id="j-slow")
    error = finished["result"]["error"]
    assert error["code"] == "PREEMPTED" and "cancelled" in error["message"]
    assert out_files(tmp_path, "j-slow") == ["error.pb"] and error_doc(tmp_path, "j-slow").kind == 1
    assert not alive(int(started))
    s.send({"op": "cancel", "id": "j-slow"})
    assert s.event(event="cancel", id="j-slow")["status"] == 409
    s.send({"op": "cancel", "id": "j-nope"})
    assert s.event(event="cancel", id="j-nope")["status"] == 404

    s.send({"op": "metrics"})
    text = s.event(event="metrics")["text"]
    assert metric_sample(text, "executor_serve_invocations_total", outcome="failure", code="PREEMPTED") == 1
    assert metric_sample(text, "executor_serve_in_flight") == 0
    s.end_input()
    assert s.proc.wait(timeout=60) == 0
    wait_for(lambda: s._events_ended, what="the end of the server's stdout")
    assert s.pending_events() == []  # nothing else was said, and every line was the protocol


# --- the one-shot path stays lean ----------------------------------------------------------------


def test_the_one_shot_path_never_imports_serve(tmp_path):
    body = invocation(tmp_path, "cold", "add", {"a": 1, "b": 1})
    code = ("import sys, runpy; sys.argv = ['executor'] + sys.argv[1:]; from executor import cli; cli.main(); "
            "print(sorted(m for m in sys.modules if m.startswith('executor.serve')))")
    proc = subprocess.run([sys.executable, "-c", code, *body["argv"]], env=env_with(), cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert output_value(tmp_path, "cold") == 2


def test_serve_help_lists_every_setting_with_its_env_var():
    from executor.serve.settings import SETTINGS

    proc = subprocess.run([sys.executable, "-m", "executor", "serve", "--help"], env=env_with(), cwd=str(REPO),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for setting in SETTINGS:
        assert setting.flag in proc.stdout and setting.env in " ".join(proc.stdout.split()), setting.name


def test_usage_errors_of_serve_itself_exit_2(tmp_path):
    for args in (["--listen", "nowhere"], ["--isolation", "none"], ["--runner-spin-us", "-1"], ["--bogus"]):
        proc = subprocess.run([sys.executable, "-m", "executor", "serve", *args], env=env_with(), cwd=str(REPO),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "executor serve" in proc.stderr, (args, proc.stderr)



# --- flytekit tasks, warm -------------------------------------------------------------------------


@pytest.mark.oracle
def test_flytekit_task_warm_matches_its_one_shot_run(tmp_path, flytekit_oracle):
    s = Server(tmp_path, "--concurrency", "2", python=flytekit_oracle.python, base_env=flytekit_oracle.env())
    try:
        secret = security_pb2.Secret(group="api", key="token")
        template = ["--task-template", str(_template(tmp_path / "t.pb", secrets=[secret]))]
        env = {"_FSEC_API_TOKEN": SECRET}
        for name in ("warm-fork", "warm-inprocess", "cold"):
            body = invocation(tmp_path, name, "secret_length", {"x": 2}, module="tests.sample_tasks.fk_runtime",
                              env=env, extra=template, isolation=name.split("-")[-1] if "warm" in name else None)
            if name == "cold":
                proc = subprocess.run([flytekit_oracle.python, "-m", "executor", *body["argv"]], cwd=str(REPO),
                                      env=flytekit_oracle.env(env), capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, proc.stderr
            else:
                record = s.run(body, timeout=300)
                assert record["result"]["outcome"] == "success", (record["result"], s.log()[-3000:])
                assert record["result"]["task"].endswith("(flytekit task)")
        cold = (tmp_path / "cold" / "out" / "outputs.pb").read_bytes()
        for name in ("warm-fork", "warm-inprocess"):
            assert (tmp_path / name / "out" / "outputs.pb").read_bytes() == cold
        assert output_value(tmp_path, "cold") == len(SECRET) + 2
        assert s.stop() == 0
        assert "flytekit task sees [redacted]" in s.log() and SECRET not in s.log()
    finally:
        s.kill()


# --- object storage -----------------------------------------------------------------------------


def test_an_in_process_runner_keeps_no_storage_client_of_an_earlier_invocations_credentials(server, tmp_path, moto_s3):
    """A storage client holds the credentials it was made with. The next invocation on the same
    runner, under other credentials, must not be able to reach them (nor be served with them)."""
    from tests.helpers import pyflyte_execute_args, write_inputs

    head, tail = "leak-c0de", "-4e11a9f3"
    bucket = moto_s3.make_bucket()
    s = server("--concurrency", "1")
    inputs = write_inputs(tmp_path / "first" / "inputs.pb", {"a": 1, "b": 2}, {"a": int, "b": int})
    moto_s3.put(bucket, "first/inputs.pb", inputs.read_bytes())
    argv = pyflyte_execute_args(f"s3://{bucket}/first/inputs.pb", f"s3://{bucket}/first/out", TASKS, "add")
    env = {**moto_s3.env, "FLYTE_AWS_SECRET_ACCESS_KEY": head + tail, "AWS_SECRET_ACCESS_KEY": head + tail}
    first = s.run({"id": "first", "argv": argv, "env": env, "isolation": "inprocess"}, timeout=60)
    assert first["result"]["outcome"] == "success", first["result"]
    assert moto_s3.get(bucket, "first/out/outputs.pb")  # written through a client made with that secret
    scan = s.run(invocation(tmp_path, "scan", "find_marker", {"head": head, "tail": tail}, env=moto_s3.env,
                            isolation="inprocess"))
    assert scan["worker_pid"] == first["worker_pid"]
    assert output_value(tmp_path, "scan")["found"] == []


def test_invocations_on_s3_in_forked_children_and_in_process(server, tmp_path, moto_s3):
    """The fork server reads the template from S3 itself and its children write outputs there: the S3
    client's runtime (obstore: tokio, which does not survive fork) must not be inherited broken."""
    from flyteidl.core import literals_pb2

    from tests.helpers import pyflyte_execute_args, write_inputs

    bucket = moto_s3.make_bucket()
    moto_s3.put(bucket, "t.pb", _template(tmp_path / "t.pb", env={"FROM_TEMPLATE": "s3"}).read_bytes())
    s = server()
    runs = [("iso-1", "fork"), ("iso-2", "fork"), ("iso-3", "fork"), ("inproc-1", "inprocess"), ("inproc-2", "inprocess")]
    for n, (name, isolation) in enumerate(runs):
        inputs = write_inputs(tmp_path / name / "inputs.pb", {"a": n, "b": 100}, {"a": int, "b": int})
        moto_s3.put(bucket, f"{name}/inputs.pb", inputs.read_bytes())
        argv = pyflyte_execute_args(f"s3://{bucket}/{name}/inputs.pb", f"s3://{bucket}/{name}/out", TASKS, "add",
                                    extra=["--task-template", f"s3://{bucket}/t.pb"])
        record = s.run({"id": name, "argv": argv, "env": moto_s3.env, "isolation": isolation}, timeout=60)
        assert record["result"]["outcome"] == "success", (record["result"], s.log()[-3000:])
        outputs = literals_pb2.LiteralMap.FromString(moto_s3.get(bucket, f"{name}/out/outputs.pb"))
        assert outputs.literals["o0"].scalar.primitive.integer == n + 100

"""Warm invocations, side by side: `executor serve` isolated and in-process against the cold one-shot path.

    python benchmarks/warm.py [--latency-runs N] [--throughput-runs N] [--clients C] [--store DIR] [--write-readme]

One trivial plain-function task (`add_plain` of benchmarks/bench_tasks.py, the one cold_start.py
times), the same inputs.pb, three contenders:
  cold        `python -m executor pyflyte-execute ...`: one fresh process per invocation (the pod path)
  isolated    POST /invocations to `executor serve`: a fresh forked child per invocation (the default)
  in-process  the same with "isolation": "inprocess": a warm runner process runs invocation after invocation

Latency: one invocation at a time, each a single HTTP round trip (POST /invocations?wait=60 on a
keep-alive connection, sent by a minimal HTTP/1.1 client: http.client's header parsing would add
~0.15 ms of client time) from the client's send to the finished result; for cold, spawn to exit.
p50 and p99 (nearest rank); the server-side figure is the server's own accepted-to-finished time.
Throughput: --clients concurrent clients (cold: one per CPU) for --throughput-runs invocations;
invocations per second of wall time, and the CPU time the server and everything under it spent per
invocation. Every invocation counts only if it wrote outputs.pb holding a + b.

The store (inputs, outputs, the server's working directories) is on tmpfs (/dev/shm) when there is
one: what is measured is the runtime, not the disk (an fsync'd atomic write costs ~7 ms on this VM's
disk). Targets, printed as PASS/MISS and never asserted: isolated p50 <= 5 ms, in-process p50 <= 1 ms,
>= 300 invocations/s on 2 cores.
`--write-readme` replaces this benchmark's section of benchmarks/README.md (between its markers) and
leaves the rest of the file alone.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"
# The same markers as benchmarks/_common.py's sections, so that its write_readme_section can keep this one.
BEGIN, END = "<!-- BEGIN warm.py (written by benchmarks/warm.py --write-readme) -->", "<!-- END warm.py -->"
TASK_MODULE = "benchmarks.bench_tasks"  # a light module: the cold path imports it too
RESOLVER = "flytekit.core.python_auto_container.default_task_resolver"
A, B = 40, 2
TARGETS = {"isolated_p50_ms": 5.0, "inprocess_p50_ms": 1.0, "throughput_per_s": 300.0}


def _say(message: str) -> None:
    print(f"[warm] {message}", file=sys.stderr, flush=True)


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def child_env(extra: dict | None = None) -> dict:
    scrub = ("FLYTE_", "AWS_", "EXECUTOR_", "GCSFS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(scrub) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


class Fixture:
    """inputs.pb, and a fresh output prefix per invocation, all under the store."""

    def __init__(self, store: Path):
        sys.path.insert(0, str(REPO))
        from executor.literals import Context, to_literal
        from flyteidl.core import literals_pb2

        self.store = store
        self.inputs = store / "inputs.pb"
        m = literals_pb2.LiteralMap()
        for name, value in (("a", A), ("b", B)):
            m.literals[name].CopyFrom(to_literal(value, int, Context(str(store / "raw"))))
        self.inputs.write_bytes(m.SerializeToString())
        self._n = 0
        self._lock = threading.Lock()

    def argv(self, label: str) -> tuple[list[str], Path]:
        with self._lock:
            self._n += 1
            prefix = self.store / "out" / f"{label}-{self._n}"
        return ["pyflyte-execute", "--inputs", str(self.inputs), "--output-prefix", str(prefix),
                "--raw-output-data-prefix", f"{prefix}/raw", "--checkpoint-path", f"{prefix}/_flytecheckpoints",
                "--prev-checkpoint", '""', "--resolver", RESOLVER, "--", "task-module", TASK_MODULE,
                "task-name", "add_plain"], prefix

    @staticmethod
    def ok(prefix: Path) -> bool:
        from flyteidl.core import literals_pb2

        try:
            m = literals_pb2.LiteralMap()
            m.ParseFromString((prefix / "outputs.pb").read_bytes())
            return m.literals["o0"].scalar.primitive.integer == A + B
        except OSError:
            return False


# ------------------------------------------------------------------------------------ cold


def cold_once(fixture: Fixture) -> tuple[float, bool]:
    argv, prefix = fixture.argv("cold")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "executor", *argv], env=child_env(), cwd=str(REPO),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started, proc.returncode == 0 and fixture.ok(prefix)


def floor_ms(runs: int = 10) -> float:
    """A bare `python -c pass` on this machine now: how fast it is at the moment of the run."""
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=child_env())
        walls.append(time.perf_counter() - started)
    return 1000 * statistics.median(walls)


def cold(fixture: Fixture, latency_runs: int, throughput_runs: int) -> dict:
    cold_once(fixture)  # warm the page cache
    samples = [cold_once(fixture) for _ in range(latency_runs)]
    workers = os.cpu_count() or 1
    results: list[bool] = []
    started = time.perf_counter()
    threads = [threading.Thread(target=lambda: results.extend(cold_once(fixture)[1] for _ in range(throughput_runs // workers)))
               for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = [s for s, ok in samples if ok]
    return {"label": "cold one-shot (a process per invocation)", "ok": sum(ok for _, ok in samples) + sum(results),
            "runs": len(samples) + len(results), "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * nearest_rank(lat, 0.99),
            "server_p50_ms": None, "throughput": len(results) / wall, "clients": workers, "cpu_ms": None}


# ------------------------------------------------------------------------------------ warm


class Serve:
    def __init__(self, store: Path, clients: int):
        self.log = open(store / "serve.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "executor", "serve", "--listen", "127.0.0.1:0", "--concurrency", str(clients),
             "--backlog", "4096", "--max-invocations-per-worker", "0", "--work-dir", str(store / "work")],
            env=child_env({"TMPDIR": str(store)}), cwd=str(REPO), stdout=self.log, stderr=self.log,
        )
        deadline = time.monotonic() + 60
        while True:
            match = re.search(r"url=http://127\.0\.0\.1:(\d+)", (store / "serve.log").read_text())
            if match:
                self.port = int(match.group(1))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"executor serve did not start: {(store / 'serve.log').read_text()}")
            time.sleep(0.02)

    def cpu_split(self) -> dict:
        """CPU seconds so far: the server process, its fork servers, and their children (runners, the
        zygote, isolated children: those reaped, and those alive now)."""
        import psutil

        main = psutil.Process(self.proc.pid)
        out = {"server": sum(main.cpu_times()[:2]), "fork servers": 0.0, "children": 0.0}
        for f in main.children():
            t = f.cpu_times()
            out["fork servers"] += t.user + t.system
            out["children"] += t.children_user + t.children_system
            for c in f.children():
                try:  # with what it reaped: the zygote forks (and reaps) the isolated children
                    out["children"] += sum(c.cpu_times()[:4])
                except psutil.Error:
                    pass
        return out

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        main = psutil.Process(self.proc.pid)
        for p in [main] + main.children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return total

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


class Connection:
    """A minimal HTTP/1.1 keep-alive client for the load: one request, then its Content-Length framed
    response. http.client parses each response's headers with the email package, which on this
    machine adds ~0.15 ms to every round trip: a latency of the client, not of the server measured
    (a caller in Go or Java pays microseconds). The server's answers are checked the same way."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def post(self, target: str, body: bytes) -> tuple[int, bytes]:
        self.sock.sendall(f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        while b"\r\n\r\n" not in self.buffer:
            self._receive()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
        if "content-length" not in headers:
            raise RuntimeError(f"the server answered without Content-Length: {status_line} {headers}")
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self._receive()
        data, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), data

    def _receive(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        self.buffer += chunk


class Client:
    def __init__(self, port: int, fixture: Fixture, isolation: str):
        self.conn = Connection(port)
        self.fixture = fixture
        self.isolation = isolation

    def invoke(self) -> tuple[float, float, bool]:
        argv, prefix = self.fixture.argv(self.isolation)
        body = json.dumps({"id": prefix.name, "argv": argv, "env": {}, "isolation": self.isolation}).encode()
        started = time.perf_counter()
        status, data = self.conn.post("/invocations?wait=60", body)
        record = json.loads(data)
        elapsed = time.perf_counter() - started
        ok = status == 200 and record.get("result", {}).get("outcome") == "success"
        return elapsed, record.get("timings_ms", {}).get("total", 0.0) / 1000, ok and self.fixture.ok(prefix)


def warm(serve: Serve, fixture: Fixture, isolation: str, latency_runs: int, throughput_runs: int, clients: int) -> dict:
    client = Client(serve.port, fixture, isolation)
    for _ in range(50):  # the pool, its imports, a runner
        client.invoke()
    samples = [client.invoke() for _ in range(latency_runs)]
    results: list[bool] = []
    lock = threading.Lock()

    def drive(n: int) -> None:
        c = Client(serve.port, fixture, isolation)
        for _ in range(n):
            ok = c.invoke()[2]
            with lock:
                results.append(ok)

    cpu_before = serve.cpu_seconds()
    split_before = serve.cpu_split()
    started = time.perf_counter()
    threads = [threading.Thread(target=drive, args=(throughput_runs // clients,)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    time.sleep(0.3)  # the last children exit and are accounted
    cpu = serve.cpu_seconds() - cpu_before
    split_after = serve.cpu_split()
    split = {k: (split_after[k] - split_before[k]) * 1000 / max(1, len(results)) for k in split_after}
    lat = [s[0] for s in samples if s[2]]
    server = [s[1] for s in samples if s[2]]
    label = {"fork": "warm, isolated (a forked child per invocation)",
             "inprocess": "warm, in-process (a warm runner)"}[isolation]
    return {"label": label, "ok": sum(s[2] for s in samples) + sum(results), "runs": len(samples) + len(results),
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * nearest_rank(lat, 0.99),
            "server_p50_ms": 1000 * statistics.median(server), "throughput": len(results) / wall, "clients": clients,
            "cpu_ms": 1000 * cpu / len(results), "cpu_split_ms": split}



# ------------------------------------------------------------------------------------ report


def machine() -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "?"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(REPO), capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(),
            "cpu": cpu, "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "commit": commit or "?"}


def median_row(rounds: list[dict]) -> dict:
    """One row for a contender measured in several rounds: each figure the median over the rounds."""
    row = dict(rounds[0])
    for field in ("p50_ms", "p99_ms", "server_p50_ms", "throughput", "cpu_ms"):
        row[field] = statistics.median(r[field] for r in rounds)
    row["cpu_split_ms"] = {k: statistics.median(r["cpu_split_ms"][k] for r in rounds) for k in rounds[0]["cpu_split_ms"]}
    row["ok"], row["runs"] = sum(r["ok"] for r in rounds), sum(r["runs"] for r in rounds)
    row["rounds"] = rounds
    return row


def targets(rows: dict) -> list[tuple[bool, str]]:
    iso, inproc = rows["fork"], rows["inprocess"]
    lines = [
        (iso["p50_ms"] <= TARGETS["isolated_p50_ms"], f"isolated p50 <= {TARGETS['isolated_p50_ms']:g} ms: {iso['p50_ms']:.2f} ms"),
        (inproc["p50_ms"] <= TARGETS["inprocess_p50_ms"], f"in-process p50 <= {TARGETS['inprocess_p50_ms']:g} ms: {inproc['p50_ms']:.2f} ms"),
        (iso["throughput"] >= TARGETS["throughput_per_s"],
         f"isolated throughput >= {TARGETS['throughput_per_s']:g}/s on {os.cpu_count()} CPUs: {iso['throughput']:.0f}/s"),
        (inproc["throughput"] >= TARGETS["throughput_per_s"],
         f"in-process throughput >= {TARGETS['throughput_per_s']:g}/s on {os.cpu_count()} CPUs: {inproc['throughput']:.0f}/s"),
    ]
    return lines


def report(rows: dict, facts: dict, command: str, store: str, load: tuple[float, float], floors: list[float]) -> str:
    floor = statistics.median(floors)
    out = [
        "## Warm invocations (`warm.py`)",
        "",
        "`warm.py` runs one trivial plain-function task (`add_plain(a: int, b: int) -> int` of `bench_tasks.py`) as the cold one-shot",
        "path (a fresh `python -m executor pyflyte-execute` process per invocation) and through `executor serve`,",
        "isolated (a fresh forked child per invocation, the default) and in-process (a warm runner), in one run.",
        "Latency is one invocation at a time, each a single HTTP round trip (`POST /invocations?wait=60`, keep-alive,",
        "from a minimal HTTP/1.1 client: `http.client`'s header parsing alone adds ~0.15 ms on this machine)",
        "from the client's send to the finished result (cold: spawn to exit); \"server p50\" is the server's own",
        "accepted-to-finished time. Throughput is concurrent clients for a fixed number of invocations; \"CPU per",
        "invocation\" is what the server and everything under it (fork servers, runners, zygotes, children) spent. Every",
        "invocation counts only if its outputs.pb holds a + b. The store is tmpfs, so the runtime is measured and",
        "not the disk (an fsync'd write costs ~7 ms on this VM's disk). The warm contenders run in rounds, each",
        "against a fresh server; the table gives each figure's median over the rounds, and every round is listed",
        "below it: this VM shares its host, and its speed can change by half within minutes.",
        "",
        "```",
        command,
        "```",
        "",
        f"- date: {facts['date']}; executor: git {facts['commit']}",
        f"- nproc: {facts['nproc']} (cpu: {facts['cpu']}); os: {facts['os']}; python: {facts['python']}",
        f"- store: {store}; load average before/after: {load[0]:.2f} / {load[1]:.2f} (the machine is shared: other",
        "  processes' work shows up as latency and lower throughput here)",
        f"- floor: a bare `python -c pass` took {floor:.0f} ms during this run (before each round: "
        f"{' / '.join(f'{f:.0f}' for f in floors)} ms)",
        "",
        "| contender | ok runs | p50 | p99 | server p50 | throughput | clients | CPU per invocation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in ("cold", "fork", "inprocess"):
        r = rows[key]
        server = f"{r['server_p50_ms']:.2f} ms" if r["server_p50_ms"] is not None else "-"
        cpu = f"{r['cpu_ms']:.2f} ms" if r["cpu_ms"] is not None else "-"
        out.append(f"| {r['label']} | {r['ok']}/{r['runs']} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {server} "
                   f"| {r['throughput']:.0f}/s | {r['clients']} | {cpu} |")
    for key in ("fork", "inprocess"):
        split = ", ".join(f"{name} {ms:.2f} ms" for name, ms in rows[key]["cpu_split_ms"].items())
        out.append(f"\n{rows[key]['label']}, CPU per invocation under throughput: {split}.")
    out += ["", "Each round (p50 / throughput):", ""]
    for key in ("fork", "inprocess"):
        rounds = " · ".join(f"{r['p50_ms']:.2f} ms / {r['throughput']:.0f}/s" for r in rows[key]["rounds"])
        out.append(f"- {rows[key]['label']}: {rounds}")
    out += ["", "Targets:"]
    out += [f"- {'PASS' if ok else 'MISS'}  {text}" for ok, text in targets(rows)]
    return "\n".join(out) + "\n"


def write_readme(section: str) -> None:
    """Replace this benchmark's section (between its markers) or append it; nothing else changes."""
    import fcntl

    README.touch(exist_ok=True)
    with open(README, "r+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # as _common.write_readme_section: one writer at a time
        text = f.read()
        block = f"{BEGIN}\n{section.strip()}\n{END}"
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        f.seek(0)
        f.write(text)
        f.truncate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-runs", type=int, default=1000, help="sequential invocations per warm contender (cold: 1/20 of it)")
    parser.add_argument("--throughput-runs", type=int, default=3000, help="invocations per warm contender (cold: 1/20 of it)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (and the server's --concurrency)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the warm contenders, a fresh server each (figures: medians)")
    parser.add_argument("--store", help="directory for inputs, outputs and the server's work dirs (default: tmpfs)")
    parser.add_argument("--write-readme", action="store_true", help="replace this benchmark's section of benchmarks/README.md")
    args = parser.parse_args(argv)
    base = args.store or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    store = Path(tempfile.mkdtemp(prefix="warm-bench-", dir=base))
    load_before = os.getloadavg()[0]
    try:
        fixture = Fixture(store)
        rows, floors, rounds = {}, [], {"fork": [], "inprocess": []}
        _say("cold one-shot")
        rows["cold"] = cold(fixture, max(10, args.latency_runs // 20), max(20, args.throughput_runs // 20))
        for n in range(1, max(1, args.rounds) + 1):
            floors.append(floor_ms())
            serve = Serve(store, args.clients)
            try:
                for isolation in rounds:
                    _say(f"round {n}: warm, {isolation}")
                    rounds[isolation].append(warm(serve, fixture, isolation, args.latency_runs, args.throughput_runs,
                                                  args.clients))
            finally:
                serve.close()
        rows.update({isolation: median_row(measured) for isolation, measured in rounds.items()})
    finally:
        shutil.rmtree(store, ignore_errors=True)
    command = "python benchmarks/warm.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else "")
    text = report(rows, machine(), command, "tmpfs (/dev/shm)" if base == "/dev/shm" else str(base or "default temp dir"),
                  (load_before, os.getloadavg()[0]), floors)
    print(text)
    if args.write_readme:
        write_readme(text)
        _say(f"wrote its section of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

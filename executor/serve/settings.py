"""Every setting of `executor serve`, declared once: flag, environment variable, default, and its doc.

The command line wins over the environment, which wins over the default. `executor serve --help`
and docs/serve.md are written from this table.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    flag: str
    env: str
    default: object
    kind: type
    doc: str


def _default_grace() -> float:
    try:
        return float(os.environ.get("EXECUTOR_GRACE_SECONDS", "") or 25)
    except ValueError:
        return 25.0


SETTINGS = (
    Setting("listen", "--listen", "EXECUTOR_SERVE_LISTEN", "127.0.0.1:8000", str,
            "HOST:PORT of the HTTP invocation API (port 0: any free port, logged at start)"),
    Setting("stdio", "--stdio", "EXECUTOR_SERVE_STDIO", False, bool,
            "speak JSON lines on stdin/stdout instead of HTTP"),
    Setting("concurrency", "--concurrency", "EXECUTOR_SERVE_CONCURRENCY", 0, int,
            "invocations running at once (0: one per CPU of the container)"),
    Setting("backlog", "--backlog", "EXECUTOR_SERVE_BACKLOG", 64, int,
            "accepted invocations waiting for a slot; beyond it a POST is refused with 429"),
    Setting("isolation", "--isolation", "EXECUTOR_SERVE_ISOLATION", "fork", str,
            "default isolation of an invocation: fork (a fresh child each) or inprocess"),
    Setting("max_pools", "--max-pools", "EXECUTOR_SERVE_MAX_POOLS", 4, int,
            "warm pools kept, one per (bundle digest, task module); the least recently used idle one goes first"),
    Setting("max_invocations_per_worker", "--max-invocations-per-worker", "EXECUTOR_SERVE_MAX_INVOCATIONS_PER_WORKER",
            10000, int, "a worker (fork server or in-process runner) is replaced after this many invocations (0: never)"),
    Setting("max_worker_rss_mib", "--max-worker-rss-mib", "EXECUTOR_SERVE_MAX_WORKER_RSS_MIB", 1024, int,
            "a worker whose resident memory is above this is replaced once idle (0: never)"),
    Setting("runner_spin_us", "--runner-spin-us", "EXECUTOR_SERVE_RUNNER_SPIN_US", 1000, int,
            "microseconds an idle in-process runner polls for its next invocation before it sleeps, yielding the "
            "CPU to anything runnable (waking a sleeping process costs ~70 us on a VM; 0: sleep at once)"),
    Setting("idle_ttl", "--idle-ttl", "EXECUTOR_SERVE_IDLE_TTL", 0.0, float,
            "exit after this many seconds with nothing running or queued (0: never)"),
    Setting("grace", "--grace", "EXECUTOR_SERVE_GRACE", None, float,
            "on SIGTERM: seconds until exit; running invocations may finish until the last stop window "
            "(default EXECUTOR_GRACE_SECONDS or 25; keep it below terminationGracePeriodSeconds)"),
    Setting("history", "--history", "EXECUTOR_SERVE_HISTORY", 4096, int,
            "finished invocations remembered for GET and for idempotent retries"),
    Setting("pass_env", "--pass-env", "EXECUTOR_SERVE_PASS_ENV", "", str,
            "comma-separated names or NAME* prefixes of the server's env given to every invocation "
            "(the request's env wins); nothing else of the server's env is"),
    Setting("work_dir", "--work-dir", "EXECUTOR_SERVE_WORK_DIR", "", str,
            "where each invocation's fresh working and temp directories are made (default: $TMPDIR/executor-serve-PID)"),
)


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:8000"
    stdio: bool = False
    concurrency: int = 0
    backlog: int = 64
    isolation: str = "fork"
    max_pools: int = 4
    max_invocations_per_worker: int = 10000
    max_worker_rss_mib: int = 1024
    runner_spin_us: int = 1000
    idle_ttl: float = 0.0
    grace: float | None = None
    history: int = 4096
    pass_env: str = ""
    work_dir: str = ""

    @property
    def slots(self) -> int:
        return self.concurrency if self.concurrency > 0 else cpu_count()

    @property
    def grace_seconds(self) -> float:
        return self.grace if self.grace is not None else _default_grace()

    @property
    def stop_window(self) -> float:
        """The end of the grace period, kept for stopping what still runs and writing its error.pb."""
        return min(5.0, self.grace_seconds / 5)

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return (host.strip("[]") or "127.0.0.1", int(port))

    def passed_env(self, environ: dict) -> dict:
        names = [n.strip() for n in self.pass_env.split(",") if n.strip()]
        return {k: v for k, v in environ.items()
                if any(k == n or (n.endswith("*") and k.startswith(n[:-1])) for n in names)}


def cpu_count() -> int:
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, int(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class SettingsError(Exception):
    pass


def parse(argv: list[str], environ: dict | None = None) -> Settings:
    environ = os.environ if environ is None else environ

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SettingsError(f"{self.prog}: {message}")

    parser = _Parser(prog="executor serve", allow_abbrev=False,
                     description="Run many invocations warm in this container, each isolated. See docs/serve.md.")
    for s in SETTINGS:
        help_text = f"{s.doc} [env {s.env}]"
        if s.kind is bool:
            parser.add_argument(s.flag, dest=s.name, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(s.flag, dest=s.name, type=s.kind, default=None, metavar=s.name.upper(), help=help_text)
    ns = parser.parse_args(argv)
    values = {}
    for s in SETTINGS:
        value = getattr(ns, s.name)
        if value is None and environ.get(s.env, "") != "":
            raw = environ[s.env]
            try:
                value = raw.strip().lower() in ("1", "true", "yes", "on") if s.kind is bool else s.kind(raw)
            except ValueError:
                raise SettingsError(f"executor serve: {s.env}={raw!r} is not a valid {s.kind.__name__}") from None
        if value is not None:
            values[s.name] = value
    settings = Settings(**values)
    if settings.isolation not in ("fork", "inprocess"):
        raise SettingsError(f"executor serve: --isolation must be fork or inprocess, got {settings.isolation!r}")
    if settings.backlog < 0 or settings.concurrency < 0 or settings.runner_spin_us < 0 or settings.max_pools < 1:
        raise SettingsError("executor serve: --backlog, --concurrency and --runner-spin-us must be >= 0, --max-pools >= 1")
    try:
        settings.address
    except ValueError:
        raise SettingsError(f"executor serve: --listen must be HOST:PORT, got {settings.listen!r}") from None
    return settings

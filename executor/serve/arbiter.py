"""`executor serve`: the main loop, its signals, the drain, and the idle exit.

Signals (as gunicorn's arbiter, one table):
"""
from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time

from executor import logs
from executor.serve import settings as settings_module
from executor.serve.server import Server

SIGNALS = {
    signal.SIGTERM: "drain: refuse new work (readyz 503, POST 503), report what is queued as PREEMPTED, let "
                    "what runs finish until the stop window, then stop it (PREEMPTED, each with its error.pb), exit",
    signal.SIGINT: "same as SIGTERM (Ctrl-C)",
}
__doc__ += "\n".join(f"    {signal.Signals(s).name:<8} {what}" for s, what in SIGNALS.items())
__doc__ += "\n    a second SIGTERM or SIGINT stops what runs at once."


class Arbiter:
    def __init__(self, settings):
        self.settings = settings
        self.signals: list[int] = []
        # The loop sleeps on a socket the C-level handler writes to (signal.set_wakeup_fd). Not a
        # threading.Event: set() from a Python handler takes the lock that the interrupted wait() may
        # hold in this same thread: the server hung on SIGTERM (or, under a flood of signals, nested
        # handlers blocked on that lock until a RecursionError killed it).
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)

    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)  # no lock: the loop acts on it

    def _sleep(self, seconds: float) -> None:
        if select.select([self._wake_r], [], [], seconds)[0]:
            try:
                while self._wake_r.recv(512):
                    pass
            except BlockingIOError:
                pass

    def run(self) -> int:
        settings = self.settings
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for s in SIGNALS:
            signal.signal(s, self._on_signal)
        stdin = stdout = None
        if settings.stdio:
            from executor.serve.api import stdio_streams

            stdin, stdout = stdio_streams()
        core = Server(settings)
        frontend = None
        httpd = None
        if settings.stdio:
            from executor.serve.api import JsonLines

            frontend = JsonLines(core, stdin, stdout)
            frontend.start()
            logs.info("serving JSON lines on stdin/stdout", concurrency=settings.slots, backlog=settings.backlog,
                      isolation=settings.isolation)
        else:
            from executor.serve.api import http_server

            httpd = http_server(core, settings.address)
            host, port = httpd.server_address[:2]
            threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="http", daemon=True).start()
            logs.info("serving", url=f"http://{host}:{port}", concurrency=settings.slots, backlog=settings.backlog,
                      isolation=settings.isolation, pid=os.getpid())
        try:
            return self._loop(core, frontend)
        finally:
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
            core.close()
            logs.info("server stopped")
            for s in SIGNALS:  # the exit status is decided: a late signal must not turn it into a kill
                signal.signal(s, signal.SIG_IGN)

    def _loop(self, core: Server, frontend) -> int:
        settings = self.settings
        drain_started = stop_at = exit_at = None
        stopped = False
        while True:
            self._sleep(0.25)
            now = time.monotonic()
            if self.signals and drain_started is None:
                name = signal.Signals(self.signals[0]).name
                grace = settings.grace_seconds
                logs.warning("asked to stop: draining", signal=name, grace_s=grace, running=core.running,
                             queued=len(core.queue))
                core.drain(name)
                drain_started = now
                stop_at = now + max(0.0, grace - settings.stop_window)
                exit_at = now + grace
            if drain_started is not None:
                if not stopped and (len(self.signals) > 1 or now >= stop_at) and not core.idle():
                    logs.warning("stopping what still runs", running=core.running)
                    core.stop_running(settings.stop_window / 2)
                    stopped = True
                if core.idle():
                    return 0
                if now >= exit_at:
                    logs.error("grace period over with invocations unreported", running=core.running)
                    return 1
                continue
            if frontend is not None and frontend.ended.is_set():
                core.close_intake()
                core.wait_idle(0.25)
                if core.idle():
                    return 0
                continue
            if settings.idle_ttl and core.close_if_idle_since(settings.idle_ttl):
                logs.info("idle for the idle TTL: exiting", idle_ttl_s=settings.idle_ttl)
                return 0


def main(argv: list[str]) -> int:
    try:
        settings = settings_module.parse(argv)
    except settings_module.SettingsError as e:
        import sys

        sys.stderr.write(f"{e}\n")
        return 2
    return Arbiter(settings).run()

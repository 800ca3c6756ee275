"""The zygote: a copy of the warm fork server that does nothing but fork its isolated children.

Why: after a fork every page of the forking process is shared copy-on-write with the child. The fork
server writes a few hundred pages for each invocation (its bookkeeping) while a spare child is alive,
and each such write is a page fault and a copy: about as much CPU as the fork itself. The zygote,
forked once, runs only this small loop, so those copies are not made; and the forks leave the fork
server's loop, which keeps answering while a spare is made.

The zygote's children are not the fork server's, so the zygote tells it about them on a socket pair:

    fork server -> zygote   ("spare", template, scratch_dir): fork a one-shot runner that rehearses it
    zygote -> fork server   ("spare", pid) with the fork server's ends of its pipes (SCM_RIGHTS)
                            ("exit", pid, status, rusage): the zygote reaped it

It dies with the fork server (PR_SET_PDEATHSIG), and its children with it; if it dies, its children
are killed and re-parented to the fork server (a subreaper), which reaps them.
"""
from __future__ import annotations

import os
import pickle
import signal
import socket

from executor import watch
from executor.serve import isolation
from executor.serve import runner as runner_module

_MAX_MESSAGE = 1 << 18  # a request carries an invocation
_MAX_EVENT = 1 << 12  # an event is a pid, a status and a rusage: a buffer of _MAX_MESSAGE would be mmapped each time


class Zygote:
    """The fork server's handle on its zygote."""

    def __init__(self, close: list[int], forget):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message per send
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                ours.close()
                _serve(theirs, close, forget)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self.sock = ours
        self.pending = 0  # spares asked for, not yet received

    def fileno(self) -> int:
        return self.sock.fileno()

    def request_spare(self, template, scratch_dir: str) -> None:
        self.sock.send(pickle.dumps(("spare", template, scratch_dir), protocol=pickle.HIGHEST_PROTOCOL))
        self.pending += 1

    def receive(self) -> tuple | None:
        """One event: ("spare", runner) or ("exit", pid, status, rusage); None once the zygote is gone."""
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, _MAX_EVENT, 4)
        except OSError:
            return None
        if not data:
            return None
        event = pickle.loads(data)
        if event[0] == "spare":
            self.pending -= 1
            report_r, journal_r, dump_r, job_w = fds
            proc = watch.Supervised(event[1], report_r, journal_r, dump_r)
            return "spare", runner_module.Runner(proc, job_w, one_shot=True)
        return event

    def close(self) -> None:
        """It exits at the end of its input (its idle spares with it)."""
        self.sock.close()


def _serve(sock: socket.socket, close: list[int], forget) -> None:
    isolation.die_with_parent()
    for fd in close:
        try:
            os.close(fd)
        except OSError:
            pass
    forget()
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the fork server decides; its children reset it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    own = [sock.fileno(), wake_r, wake_w]
    warm = False
    while True:
        for fd in watch.wait_readable([sock.fileno(), wake_r], 60.0):
            if fd == wake_r:
                try:
                    while os.read(wake_r, 512):
                        pass
                except OSError:
                    pass
                continue
            data = sock.recv(_MAX_MESSAGE)
            if not data:
                return
            _, template, scratch_dir = pickle.loads(data)
            if template is not None and not warm:
                runner_module.warm_up(template, scratch_dir)
                warm = True
            runner = runner_module.fork(one_shot=True, relay=False, close=own, forget=lambda: None,
                                        rehearse=template, scratch_dir=scratch_dir)
            proc = runner.proc
            fds = [proc.report_r, proc.journal_r, proc.dump_r, runner.job_w]
            socket.send_fds(sock, [pickle.dumps(("spare", proc.pid))], fds)
            for fd in fds:
                os.close(fd)
        _reap(sock)


def _reap(sock: socket.socket) -> None:
    for pid, status, rusage in watch.exited_children():
        sock.send(pickle.dumps(("exit", pid, status, rusage)))

"""Messages between the server and its own worker processes: length-prefixed pickles on a socket pair.

Only ever between processes of this server (never a network peer), so pickle is safe here and keeps
the Invocation dataclasses intact.

The server's side never blocks on a send: a message goes out at once when the socket has room, and
otherwise waits in an ordered buffer that a flusher thread writes as the worker reads. (A send that
blocked while holding the server's lock could deadlock with a worker blocked sending to us.) The
worker's side (a single-threaded loop) sends blocking and receives incrementally with pump().

Results: a datagram socket beside each channel, on which an in-process runner reports a successful
invocation straight to the server (one message per datagram, so several runners may share it; a
message that does not fit at once is not sent, and the fork server's own report follows anyway).
JSON, not pickle: a runner runs task code, so what it sends is data to check, never objects.

Leases: a fork server may send the server a descriptor with a message (SCM_RIGHTS): the write end
of an idle in-process runner's job pipe, which the server writes exactly one invocation to
(write_frame), then closes.
"""
from __future__ import annotations

import json
import os
import pickle
import select
import socket
import threading

_HEADER = 4
_MAX_FDS = 16  # per receive: a unix stream socket delivers one sendmsg's descriptors per recvmsg


class Closed(Exception):
    """The other side is gone."""


class Channel:
    def __init__(self, sock: socket.socket, nonblocking: bool = False):
        self.sock = sock
        self.nonblocking = nonblocking
        sock.setblocking(not nonblocking)
        self._buffer = bytearray()
        self._pending = bytearray()
        self._fds: list[int] = []  # received with the frames not yet taken, in order
        self._lock = threading.Lock()
        self._has_pending = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def discard_buffers(self) -> None:
        """In a forked child that will never use this channel: what it had read or not yet sent (other
        invocations' messages) is dropped."""
        self._buffer = bytearray()
        self._pending = bytearray()
        _close_all(self._fds)

    # --- sending -----------------------------------------------------------------------------------

    def send(self, message: dict) -> None:
        data = frame(message)
        with self._lock:
            if self._closed:
                raise Closed("closed")
            if not self.nonblocking:
                try:
                    self.sock.sendall(data)
                except OSError as e:
                    raise Closed(str(e)) from None
                return
            self._pending += data
            self._flush_locked()
            if self._pending:
                if self._flusher is None:
                    self._flusher = threading.Thread(target=self._flush_forever, name="channel-flusher", daemon=True)
                    self._flusher.start()
                self._has_pending.notify()

    def send_with_fd(self, message: dict, fd: int) -> None:
        """The worker's side (blocking): a message with a descriptor (a dup of it travels; `fd`
        stays ours). The receiver finds it as message["fd"]."""
        data = frame({**message, "fd": True})
        with self._lock:
            if self._closed or self.nonblocking:
                raise Closed("closed" if self._closed else "descriptors go from a worker only")
            try:
                sent = socket.send_fds(self.sock, [data], [fd])
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            except OSError as e:
                raise Closed(str(e)) from None

    def _flush_locked(self) -> None:
        while self._pending:
            try:
                sent = self.sock.send(self._pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._pending.clear()  # the reader side notices the end of the stream
                return
            del self._pending[:sent]

    def _flush_forever(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._has_pending.wait()
                if self._closed:
                    return
            try:
                select.select([], [self.sock], [], 1.0)
            except (OSError, ValueError):
                return
            with self._lock:
                self._flush_locked()

    # --- receiving ---------------------------------------------------------------------------------

    def recv(self) -> dict:
        """Block until one whole message has arrived (Closed at end of stream)."""
        while True:
            message = self._take()
            if message is not None:
                return message
            if self.nonblocking:
                select.select([self.sock], [], [])
            self._receive()

    def pump(self) -> list[dict]:
        """After select() said readable: every whole message available now (Closed at end of stream)."""
        self._receive()
        return self.buffered()

    def buffered(self) -> list[dict]:
        """Whole messages already received (recv() may have read past the one it returned)."""
        messages = []
        while (message := self._take()) is not None:
            messages.append(message)
        return messages

    def _receive(self) -> None:
        try:
            chunk, fds, flags, _ = socket.recv_fds(self.sock, 1 << 16, _MAX_FDS, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            raise Closed(str(e)) from None
        if flags & socket.MSG_CTRUNC and not fds:  # dropped by the kernel (out of descriptors): its frame gets -1
            fds = [-1]
        self._fds += fds
        if not chunk:
            raise Closed("end of stream")
        self._buffer += chunk

    def _take(self) -> dict | None:
        if len(self._buffer) < _HEADER:
            return None
        size = int.from_bytes(self._buffer[:_HEADER], "big")
        if len(self._buffer) < _HEADER + size:
            return None
        data = bytes(self._buffer[_HEADER:_HEADER + size])
        del self._buffer[:_HEADER + size]
        message = pickle.loads(data)
        if message.get("fd") is True:  # its descriptor came with its first byte, after those of earlier frames
            message["fd"] = self._fds.pop(0) if self._fds else -1
        return message

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._has_pending.notify_all()
        _close_all(self._fds)
        try:
            self.sock.close()
        except OSError:
            pass


def _close_all(fds: list[int]) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


def frame(message: dict) -> bytes:
    """A message as it travels: its pickle's length, then the pickle."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(_HEADER, "big") + data


def write_frame(fd: int, data: bytes) -> None:
    """One framed message to a runner's job pipe (blocking: the runner reads promptly)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def pair() -> tuple[Channel, int]:
    """A (non-blocking) channel for the server and the raw fd to hand to a worker (inheritable)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = theirs.detach()
    os.set_inheritable(fd, True)
    return Channel(ours, nonblocking=True), fd


_MAX_RESULT = 1 << 16


def results_pair() -> tuple[socket.socket, int]:
    """The server's (non-blocking) end of a results socket, and the raw fd to hand to a worker."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    fd = theirs.detach()
    os.set_inheritable(fd, True)
    return ours, fd


def send_result(sock: socket.socket, message: dict) -> bool:
    """One datagram, never blocking: False if it could not go out now (the caller's fallback reports it)."""
    data = json.dumps(message).encode()
    if len(data) > _MAX_RESULT:
        return False
    try:
        return sock.send(data, socket.MSG_DONTWAIT) == len(data)
    except OSError:
        return False


def receive_results(sock: socket.socket, most: int = 256) -> list[dict]:
    """The datagrams waiting now (at most `most`) that have a result's shape; anything else is dropped."""
    messages = []
    for _ in range(most):
        try:
            data = sock.recv(_MAX_RESULT)
        except (BlockingIOError, InterruptedError):
            break
        try:
            message = json.loads(data)
        except ValueError:
            continue
        if (isinstance(message, dict) and isinstance(message.get("id"), str) and isinstance(message.get("token"), str)
                and isinstance(message.get("result"), dict) and isinstance(message.get("pid", 0), int)):
            messages.append(message)
    return messages

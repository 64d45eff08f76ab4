"""A direct channel from the gateway to a worker on its machine: a Unix socket beside Ray's actor call.

A Ray actor call costs the gateway about 1 ms a request on the 2-core machine (the submit, Ray's threads
on both sides, the reply's callback) where the request itself is a slot's path (``gateway.shm``); the
stream's Ray path pays the same call once, so the gateway's own addition was that call again on top of
HTTP.  For a worker on the gateway's machine, the request can go instead over a Unix socket straight into
the worker's process: ``ChannelServer`` listens there (started by ``cluster.WorkerActor.open_channel``; a
thread per connection, each running the worker's ``run_tensor`` as one of Ray's actor threads would), and
``WorkerChannel`` is the gateway's side (asyncio, a pool of connections per worker, one request at a time
on each).  Ray stays the control plane: it starts, places, restarts the workers and sets their mode; a
worker on another machine, or ``serve.channel = "ray"``, keeps the actor call.

The wire: the socket's name is in Linux's abstract namespace (no file to leave behind; it dies with the
process), and a connection is taken only after it sends the worker's 16-byte random token (given to the
gateway through Ray), compared in constant time.  Then each request is a header ``<BI`` (kind, length) and
its payload: ``SLOT`` with ``b"PATH LENGTH"`` of a shared-memory slot, or ``INLINE`` with the request's bytes
(``protocol.encode_tensor_request``); the answer is ``<BI`` (``ANSWER`` or ``FAILED``) and the answer's
bytes (``protocol.encode_tensor_result``) or the error's message.

Faults: a connection that closes or cannot be made is ``WorkerLostError`` (the gateway takes the worker out
and recovers it through Ray, then opens a new channel); a call not answered in time closes its connection
(a late answer must not be read as the next one's) and is ``WorkerError``; an error raised in the worker is
``RemoteError``.  Plain Python: sockets, threads, asyncio.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cortexbench.errors import WorkerError, WorkerLostError

HEAD = struct.Struct("<BI")
SLOT, INLINE = 0, 1  # request kinds
ANSWER, FAILED = 0, 1  # answer kinds
TOKEN_BYTES = 16
MAX_CONNECTIONS = 1024  # a worker serves at most this many connections at once (a gateway opens 64 at most)


class RemoteError(Exception):
    """The worker raised while it ran a request (its message, as the worker said it)."""


@dataclass(frozen=True)
class ChannelAddress:
    """Where a worker's channel listens (an abstract Unix socket name) and the token it takes."""

    name: str
    token: bytes


Handler = Callable[[int, bytes], bytes]


class ChannelServer:
    """The worker's side: listens on an abstract Unix socket and runs ``handler(kind, payload)`` for each
    request, a thread per connection.  ``address`` is what the gateway needs to connect."""

    def __init__(self, handler: Handler, prefix: str = "cortexbench-ch") -> None:
        self.handler = handler
        token = os.urandom(TOKEN_BYTES)
        name = f"{prefix}-{os.getpid()}-{token[:4].hex()}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind("\0" + name)
        self._sock.listen(MAX_CONNECTIONS)
        self.address = ChannelAddress(name, token)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="channel-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed or len(self._conns) >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="channel-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if not hmac.compare_digest(_recv_exact(conn, TOKEN_BYTES) or b"", self.address.token):
                return
            while True:
                head = _recv_exact(conn, HEAD.size)
                if head is None:
                    return
                kind, n = HEAD.unpack(head)
                payload = _recv_exact(conn, n)
                if payload is None:
                    return
                try:
                    out, status = self.handler(kind, payload), ANSWER
                except Exception as e:  # the request's own failure: said to the gateway, the channel goes on
                    out, status = f"{type(e).__name__}: {str(e).strip()[:500]}".encode(), FAILED
                conn.sendmsg([HEAD.pack(status, len(out)), out])
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        """Stop listening and close every connection (their gateways see the worker as lost)."""
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        for s in (self._sock, *conns):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None when the peer closed first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


class _Connection(asyncio.Protocol):
    """One connection of the gateway's side: one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[bytes] | None = None
        self.closed = False
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) < HEAD.size:
            return
        kind, n = HEAD.unpack_from(self._buf)
        if len(self._buf) < HEAD.size + n:
            return
        body = bytes(self._buf[HEAD.size:HEAD.size + n])
        del self._buf[:HEAD.size + n]
        w, self.waiter = self.waiter, None
        if w is None or w.done():
            self.close()  # an answer nobody asked for: the stream is out of step
            return
        if kind == ANSWER:
            w.set_result(body)
        else:
            w.set_exception(RemoteError(body.decode(errors="replace")))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_exception(ConnectionResetError("the worker closed the channel"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            try:
                self.transport.close()
            except RuntimeError:  # its event loop is closed already (the gateway stopping): the socket goes with it
                pass


class WorkerChannel:
    """The gateway's side of one worker's channel: up to ``max_connections`` requests at once (the rest
    wait for a connection, as Ray queues calls past an actor's threads).  Used from one event loop."""

    def __init__(self, address: ChannelAddress, name: str, max_connections: int = 64) -> None:
        self.address = address
        self.name = name
        self.max_connections = max_connections
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiting: list[asyncio.Future[None]] = []

    async def call(self, kind: int, payload: bytes, timeout_s: float) -> bytes:
        """The worker's answer to one request; WorkerLostError when the channel broke (the worker died),
        WorkerError when it did not answer within ``timeout_s``, RemoteError when it raised."""
        conn = await self._take()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        conn.waiter = fut
        assert conn.transport is not None
        conn.transport.writelines([HEAD.pack(kind, len(payload)), payload])
        timer = loop.call_later(timeout_s, expire, fut)
        try:
            out = await fut
        except ConnectionResetError:
            self._drop(conn)
            raise WorkerLostError(f"worker {self.name} is gone (its channel closed)") from None
        except asyncio.TimeoutError:
            conn.close()  # its answer may still come: never read it as the next request's
            self._drop(conn)
            raise WorkerError(f"worker {self.name} did not answer within {timeout_s:g} s") from None
        except BaseException:  # cancelled (the client went away): the answer may still come
            conn.close()
            self._drop(conn)
            raise
        finally:
            timer.cancel()
        self._give_back(conn)
        return out

    async def _take(self) -> _Connection:
        while True:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
                self._open -= 1
            if self._open < self.max_connections:
                self._open += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._open -= 1
                    raise
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        # connected here, then handed to the loop: uvloop takes no abstract socket name (a local connect is
        # at once: the worker's backlog holds MAX_CONNECTIONS)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect("\0" + self.address.name)
            sock.setblocking(False)
            _, conn = await loop.create_unix_connection(_Connection, sock=sock)
        except OSError as e:
            sock.close()
            raise WorkerLostError(f"worker {self.name} is gone (its channel: {e.strerror or e})") from None
        assert conn.transport is not None
        conn.transport.write(self.address.token)
        return conn

    def _give_back(self, conn: _Connection) -> None:
        if conn.closed:
            self._drop(conn)
            return
        self._idle.append(conn)
        self._wake()

    def _drop(self, conn: _Connection) -> None:
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiting:
            w = self._waiting.pop(0)
            if not w.done():
                w.set_result(None)
                return

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def expire(fut: asyncio.Future[Any]) -> None:
    """A call's deadline passed: its future raises asyncio.TimeoutError (no task or wait_for per call)."""
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())

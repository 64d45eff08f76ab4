"""A small HTTP/1.1 client for the load generator's hot path: keep-alive connections, request bytes built
before the run, responses read with one header parse.

The HTTP target sends the same few request bodies millions of times to one server.  A general client
(httpx) spends about a millisecond of Python per request on things a load generator does not need (URL
parsing, header objects, redirects, cookies); this one writes prepared bytes and reads ``Content-Length``
or chunked bodies, nothing else.  ``bench/http_driver.py`` compares it with httpx and wrk.

``Pool(host, port, size)`` keeps up to ``size`` open connections; ``await pool.request(head, body)`` sends
one request on a free connection (opening one when none is free, waiting when ``size`` are busy) and returns
``(status, headers, body)``; a connection the server closed is reopened once before the error is raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

MAX_HEADER = 64 * 1024


class HttpError(Exception):
    """The connection failed or the answer was not HTTP/1.1 (the caller treats it as a lost connection)."""


def request_head(method: str, host: str, path: str, headers: Mapping[str, str], body_len: int) -> bytes:
    """The request line and headers, ready to write before a body of ``body_len`` bytes."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {body_len}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length", "connection")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, head: bytes, body: bytes) -> Response:
        self.writer.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.writer.write(body)
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        if len(raw) > MAX_HEADER:
            raise HttpError("response header too large")
        status_line, *header_lines = raw[:-4].decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HttpError(f"not an HTTP/1.x answer: {status_line[:80]!r}")
        headers = {}
        for line in header_lines:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            data = await self._chunked()
        else:
            data = b""
        return Response(int(parts[1]), headers, data)

    async def _chunked(self) -> bytes:
        chunks = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(chunks)
            chunks.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        self.writer.close()


class Pool:
    """See the module docstring."""

    def __init__(self, host: str, port: int, size: int, timeout_s: float = 30.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(size)

    async def _open(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_HEADER * 16)
        return _Conn(reader, writer)

    async def request(self, head: bytes, body: bytes) -> Response:
        """Send one request; raises asyncio.TimeoutError after ``timeout_s`` and HttpError (or OSError) when
        the connection fails twice."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            for attempt in (0, 1):
                if conn is None:
                    conn = await asyncio.wait_for(self._open(), self.timeout_s)
                try:
                    resp = await asyncio.wait_for(conn.send(head, body), self.timeout_s)
                except (asyncio.IncompleteReadError, ConnectionError, HttpError, asyncio.LimitOverrunError) as e:
                    conn.close()
                    conn = None
                    if attempt:
                        raise HttpError(f"{type(e).__name__}: {e}") from None
                    continue  # a keep-alive connection the server had closed: once more on a new one
                except BaseException:
                    conn.close()  # a time-out or cancel leaves the connection mid-answer: not reusable
                    raise
                if resp.headers.get("connection", "").lower() == "close":
                    conn.close()
                else:
                    self._idle.append(conn)
                return resp
            raise HttpError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

"""cortexbench's own HTTP/1.1 client against a real asyncio server on 127.0.0.1 (an ephemeral port):
Content-Length and chunked bodies, keep-alive reuse, a connection the server closes, a time-out."""

from __future__ import annotations

import asyncio

import pytest

from cortexbench.http_client import HttpError, Pool, request_head


async def _serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


def test_lengths_chunks_reuse_and_a_closed_connection():
    connections = []

    async def handler(reader, writer):
        connections.append(1)
        n = 0
        while True:
            try:
                body = await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            n += 1
            if body == b"chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
            elif body == b"close":
                writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy")
                await writer.drain()
                writer.close()
                return
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-N: %d\r\n\r\n%s" % (len(body), n, body))
            await writer.drain()

    async def main():
        server, port = await _serve(handler)
        pool = Pool("127.0.0.1", port, size=1)
        head = lambda body: request_head("POST", f"127.0.0.1:{port}", "/x", {"X-A": "1"}, len(body))  # noqa: E731
        r1 = await pool.request(head(b"hello"), b"hello")
        r2 = await pool.request(head(b"chunked"), b"chunked")
        r3 = await pool.request(head(b"again"), b"again")
        assert (r1.status, r1.body, r1.headers["x-n"]) == (200, b"hello", "1")
        assert (r2.status, r2.body) == (200, b"abcde")
        assert (r3.body, r3.headers["x-n"]) == (b"again", "3") and len(connections) == 1  # one kept-alive
        r4 = await pool.request(head(b"close"), b"close")
        assert (r4.status, r4.body) == (503, b"busy")
        r5 = await pool.request(head(b"new"), b"new")  # the server closed the last one: a new connection
        assert r5.body == b"new" and len(connections) == 2
        await pool.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_a_refused_connection_and_a_time_out_raise():
    async def slow(reader, writer):
        await _read_request(reader)
        await asyncio.sleep(5)

    async def main():
        server, port = await _serve(slow)
        server.close()
        await server.wait_closed()  # nothing listens on the port any more
        with pytest.raises(OSError):
            await Pool("127.0.0.1", port, size=1).request(b"GET / HTTP/1.1\r\n\r\n", b"")
        server, port = await _serve(slow)
        pool = Pool("127.0.0.1", port, size=2, timeout_s=0.1)
        with pytest.raises(asyncio.TimeoutError):
            await pool.request(request_head("POST", "h", "/", {}, 1), b"x")
        await pool.close()
        server.close()

    asyncio.run(main())


def test_a_server_that_answers_garbage_is_an_http_error():
    async def garbage(reader, writer):
        await _read_request(reader)
        writer.write(b"SSH-2.0-not http\r\n\r\n")
        await writer.drain()

    async def main():
        server, port = await _serve(garbage)
        with pytest.raises(HttpError, match=r"not an HTTP/1\.x answer"):
            await Pool("127.0.0.1", port, size=1).request(request_head("POST", "h", "/", {}, 1), b"x")
        server.close()

    asyncio.run(main())

"""The gateway's direct channel to a worker (``gateway.channel``): a real Unix socket and real threads on
the worker's side, a real asyncio loop on the gateway's; the worker is a real ``ModelWorker`` (mxnet, the
null model) or a handler that stands in for one where a test needs it to block or raise."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from cortexbench.errors import WorkerError, WorkerLostError
from cortexbench.gateway.channel import (
    INLINE,
    SLOT,
    ChannelAddress,
    ChannelServer,
    RemoteError,
    WorkerChannel,
)
from cortexbench.gateway.shm import SharedSlots, SlotReader
from cortexbench.images.dataset import list_images
from cortexbench.protocol import decode_tensor_result, encode_tensor_request, write_tensor_request
from cortexbench.worker import ModelWorker, WorkerSpec


@pytest.fixture(scope="module")
def worker(model_dir: Path, image_dir: Path):
    spec = WorkerSpec(name="cpu0", device="cpu", backend="mxnet", model_dir=str(model_dir), models=("null", "mnist_cnn"),
                      images=tuple(str(p) for p in list_images(image_dir)), lanes=2, image_pool=4)
    w = ModelWorker(spec)
    w.set_mode("cached")
    yield w
    w.close()


def _serve_worker(worker: ModelWorker) -> ChannelServer:
    reader = SlotReader()

    def handle(kind: int, payload: bytes) -> bytes:  # as cluster.WorkerActor.open_channel's handler
        if kind == INLINE:
            return worker.run_tensor(payload)
        path, _, n = payload.decode().rpartition(" ")
        return worker.run_tensor(reader.view(path, int(n)))

    return ChannelServer(handle)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # serve runs uvloop where it is installed
def test_requests_inline_and_in_shared_memory_get_the_workers_own_answer(worker, loop):
    server = _serve_worker(worker)
    slots = SharedSlots(1 << 20, 2)
    x = np.random.default_rng(0).random((1, 1, 28, 28), np.float32)
    direct = decode_tensor_result(worker.run_tensor(encode_tensor_request(0, 1, x)))[1]

    async def run() -> list[np.ndarray]:
        ch = WorkerChannel(server.address, "cpu0")
        slot = slots.acquire()
        assert slot is not None
        n = write_tensor_request(memoryview(slot.buf), 1, 1, x)
        outs = [await ch.call(INLINE, encode_tensor_request(2, 1, x), 5.0),
                await ch.call(SLOT, f"{slot.path} {n}".encode(), 5.0),
                await ch.call(INLINE, encode_tensor_request(3, 1, x), 5.0)]
        assert ch._open == 1  # one request at a time: the one connection carried all three
        ch.close()
        return [decode_tensor_result(o)[1] for o in outs]

    try:
        if loop == "uvloop":
            uvloop = pytest.importorskip("uvloop")
            got = uvloop.run(run())
        else:
            got = asyncio.run(run())
        for y in got:
            assert np.array_equal(y, direct)
    finally:
        server.close()
        slots.close()


def test_a_wrong_token_is_refused_before_anything_runs():
    ran: list[int] = []
    server = ChannelServer(lambda kind, payload: ran.append(kind) or b"ok")
    try:
        wrong = ChannelAddress(server.address.name, bytes(16))
        with pytest.raises(WorkerLostError, match="channel closed"):
            asyncio.run(WorkerChannel(wrong, "cpu0").call(INLINE, b"x", 5.0))
        assert ran == []
        assert asyncio.run(WorkerChannel(server.address, "cpu0").call(INLINE, b"x", 5.0)) == b"ok"
    finally:
        server.close()


def test_an_error_in_the_worker_is_its_message_and_the_connection_goes_on():
    def handle(kind: int, payload: bytes) -> bytes:
        if payload == b"bad":
            raise ValueError("no model #9")
        return payload[::-1]

    server = ChannelServer(handle)

    async def run() -> None:
        ch = WorkerChannel(server.address, "cpu0")
        with pytest.raises(RemoteError, match="ValueError: no model #9"):
            await ch.call(INLINE, b"bad", 5.0)
        assert await ch.call(INLINE, b"abc", 5.0) == b"cba"
        assert ch._open == 1

    try:
        asyncio.run(run())
    finally:
        server.close()


def test_a_late_answer_is_never_read_as_the_next_requests():
    release = threading.Event()

    def handle(kind: int, payload: bytes) -> bytes:
        if payload == b"slow":
            release.wait(30)
        return payload

    server = ChannelServer(handle)

    async def run() -> None:
        ch = WorkerChannel(server.address, "cpu0", max_connections=1)
        with pytest.raises(WorkerError, match=r"did not answer within 0\.2 s"):
            await ch.call(INLINE, b"slow", 0.2)
        release.set()  # its answer comes now, on the connection the time-out closed
        assert await ch.call(INLINE, b"next", 5.0) == b"next"

    try:
        asyncio.run(run())
    finally:
        release.set()
        server.close()


def test_calls_past_the_connections_wait_for_one_and_all_are_answered():
    both = threading.Barrier(2, timeout=30)  # the first two run at once, on two connections, or this breaks
    calls: list[bytes] = []

    def handle(kind: int, payload: bytes) -> bytes:
        calls.append(payload)
        if payload in (b"0", b"1"):
            both.wait()
        return payload

    server = ChannelServer(handle)

    async def run() -> list[bytes]:
        ch = WorkerChannel(server.address, "cpu0", max_connections=2)
        outs = await asyncio.gather(*(ch.call(INLINE, str(i).encode(), 30.0) for i in range(5)))
        assert ch._open == 2
        return outs

    try:
        assert asyncio.run(run()) == [b"0", b"1", b"2", b"3", b"4"]
        assert sorted(calls[:2]) == [b"0", b"1"]
    finally:
        server.close()


def test_a_worker_that_closes_is_lost_for_the_call_in_flight_and_the_next():
    started = threading.Event()
    server_box: list[ChannelServer] = []

    def handle(kind: int, payload: bytes) -> bytes:
        started.set()
        server_box[0].close()  # the worker goes away while it runs the request
        return payload

    server = ChannelServer(handle)
    server_box.append(server)

    async def run() -> None:
        ch = WorkerChannel(server.address, "cpu0")
        with pytest.raises(WorkerLostError, match="gone"):
            await ch.call(INLINE, b"x", 30.0)
        assert started.is_set()
        with pytest.raises(WorkerLostError, match="gone"):
            await ch.call(INLINE, b"y", 30.0)  # nothing listens any more
        assert ch._open == 0

    asyncio.run(run())


def test_a_cancelled_call_frees_its_connection():
    release, running = threading.Event(), threading.Event()

    def handle(kind: int, payload: bytes) -> bytes:
        if payload == b"slow":
            running.set()
            release.wait(30)
        return payload

    server = ChannelServer(handle)

    async def run() -> None:
        ch = WorkerChannel(server.address, "cpu0", max_connections=1)
        task = asyncio.ensure_future(ch.call(INLINE, b"slow", 30.0))
        assert await asyncio.get_running_loop().run_in_executor(None, running.wait, 30)  # the worker runs it
        task.cancel()  # the client went away while the worker runs it
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert await asyncio.wait_for(ch.call(INLINE, b"next", 30.0), 30) == b"next"

    try:
        asyncio.run(run())
    finally:
        release.set()
        server.close()
